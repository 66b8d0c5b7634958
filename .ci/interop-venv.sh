#!/usr/bin/env bash
# Builds (once) and prints the path of the second environment the interop tests run in:
# torch 2.14.1 + torchvision 0.29.1 + the peer packages (open_clip, CLIP_benchmark, clip-retrieval),
# with clipforge installed editable from this checkout. The main environment stays torch 2.13.0 CPU
# without torchvision; the seams with the peers are tested against the peers themselves here.
# Reused when its stamp matches the pinned set below; rebuilt otherwise.
set -euo pipefail
VENV="${CLIPFORGE_INTEROP_VENV:-/opt/clipforge-interop}"
PINS="torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0"
NODEPS="clip-benchmark==1.6.2 clip-retrieval==2.45.0 clip-anytorch img2dataset==1.47.0 webdataset==1.0.2 braceexpand embedding-reader"
EXTRA="pytest transformers safetensors ftfy regex pyyaml matplotlib tqdm pyarrow pandas faiss-cpu fastapi uvicorn httpx python-multipart scikit-learn requests aiohttp fsspec numpy pillow"
stamp="$PINS | $NODEPS | $EXTRA"
log="$(mktemp)"; trap 'rm -f "$log"' EXIT
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "interop-venv: building $VENV ($PINS; a few minutes from the local wheel cache)" >&2
    rm -rf "$VENV"
    python -m venv "$VENV" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    { "$VENV/bin/pip" install -q $PINS && "$VENV/bin/pip" install -q $EXTRA \
      && "$VENV/bin/pip" install -q --no-deps $NODEPS; } >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    echo "$stamp" > "$VENV/.stamp"
fi
"$VENV/bin/pip" install -q --no-deps -e . >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
echo "$VENV"
