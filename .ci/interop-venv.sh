#!/usr/bin/env bash
# Creates a NEW virtual environment at $CLIPFORGE_INTEROP_VENV (default /tmp/clipforge-interop, replaced
# if present) for the interop tests: torch 2.14.1 + torchvision 0.29.1 + the peer packages (open_clip,
# timm, transformers, CLIP_benchmark, clip-retrieval), with clipforge installed editable from this checkout.
# The main environment stays torch 2.13.0 CPU without torchvision; the seams with the peers are tested
# against the peers themselves here. Versions come from .ci/interop-constraints.txt (the lock), unless
# CLIPFORGE_NO_LOCK=1 (the newest-releases check, scripts/lock.py check --env interop).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CLIPFORGE_INTEROP_VENV:-/tmp/clipforge-interop}"
PINS="torch==2.14.1 torchvision==0.29.1 open_clip_torch"
# Installed without their dependencies: their requirements would replace torch or pull unused stacks.
NODEPS="clip-benchmark clip-retrieval clip-anytorch img2dataset webdataset braceexpand embedding-reader"
EXTRA="pytest timm transformers sentencepiece tokenizers safetensors ftfy regex pyyaml matplotlib tqdm pyarrow
pandas faiss-cpu fastapi uvicorn httpx python-multipart scikit-learn requests aiohttp fsspec numpy pillow"
lock=()
if [ "${CLIPFORGE_NO_LOCK:-0}" != "1" ]; then lock=(-c .ci/interop-constraints.txt); fi
log="$(mktemp)"; trap 'rm -f "$log"' EXIT
echo "interop-venv: new environment $VENV (${lock[*]:-newest releases}; a few minutes from the local wheel cache)" >&2
rm -rf "$VENV"
python3 -m venv "$VENV" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
# shellcheck disable=SC2086
{ "$VENV/bin/pip" install -q "${lock[@]}" $PINS $EXTRA \
  && "$VENV/bin/pip" install -q "${lock[@]}" --no-deps $NODEPS \
  && "$VENV/bin/pip" install -q --no-deps -e .; } >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
echo "$VENV"
