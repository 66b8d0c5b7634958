#!/usr/bin/env bash
# Search demo on real photos: Flickr8k test split (1,000 photos + captions from shared/data)
#   embed -> index -> serve -> screenshot of the web page with results for a text query.
#
#   scripts/search_demo.sh --model runs/my_model/checkpoint.safetensors
#   scripts/search_demo.sh --model tiny-vit --random-init          # untrained: layout check only
#
# Options: --query TEXT (default "a dog running on the beach"), --out PNG
# (default benchmarks/results/search_page.png), --work DIR (kept; default a temp dir, deleted),
# --data DIR (shared data folder; default ../shared/data next to the repo), --port N (default: free).
# Needs chromium + playwright for the screenshot (.ci/install-browser.sh); never `playwright install`.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
MODEL=""; RANDOM_INIT=""; QUERY="a dog running on the beach"; OUT="$REPO/benchmarks/results/search_page.png"
WORK=""; DATA="${CLIPFORGE_SHARED_DATA:-$REPO/../shared/data}"; PORT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL="$2"; shift 2;;
        --random-init) RANDOM_INIT="--random-init"; shift;;
        --query) QUERY="$2"; shift 2;;
        --out) OUT="$2"; shift 2;;
        --work) WORK="$2"; shift 2;;
        --data) DATA="$2"; shift 2;;
        --port) PORT="$2"; shift 2;;
        -h|--help) sed -n 2,12p "$0"; exit 0;;
        *) echo "search_demo: unknown argument $1" >&2; exit 2;;
    esac
done
[ -n "$MODEL" ] || { echo "search_demo: --model is required" >&2; exit 2; }
TAR="$DATA/flickr8k/images_128_test.tar"
[ -f "$TAR" ] || { echo "search_demo: $TAR not found (set --data)" >&2; exit 1; }
PY="${PYTHON:-python}"

CLEAN_WORK=""
if [ -z "$WORK" ]; then WORK="$(mktemp -d -t cf-search-demo-XXXXXX)"; CLEAN_WORK=1; fi
mkdir -p "$WORK/photos"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    if [ -n "$CLEAN_WORK" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "== photos + captions -> $WORK"
tar -xf "$TAR" -C "$WORK/photos"
# manifest: one row per caption (rows of the same image merge into one sample with 5 captions)
"$PY" - "$DATA/flickr8k/captions.tsv" "$WORK/photos" "$WORK/flickr8k_test.tsv" <<'EOF'
import sys
src, photos, out = sys.argv[1:]
with open(src, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
    next(f)
    g.write("image\tcaption\n")
    for line in f:
        image, split, _, caption = line.rstrip("\n").split("\t")
        if split == "test":
            g.write(f"photos/{image}\t{caption}\n")
EOF

echo "== embed"
"$PY" -m clipforge.cli.main embed --model "$MODEL" $RANDOM_INIT --manifest "$WORK/flickr8k_test.tsv" \
    --out "$WORK/emb" --shard-size 500
echo "== index"
"$PY" -m clipforge.cli.main index --embeddings "$WORK/emb" --out "$WORK/idx" --no-progress

if [ -z "$PORT" ]; then
    PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
fi
echo "== serve on 127.0.0.1:$PORT"
"$PY" -m clipforge.cli.main serve --index "$WORK/idx" --model "$MODEL" $RANDOM_INIT --host 127.0.0.1 \
    --port "$PORT" --log-level warning > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 120); do
    if "$PY" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; then
        break
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server died:"; cat "$WORK/server.log"; exit 1; }
    sleep 0.5
done

echo "== screenshot -> $OUT"
mkdir -p "$(dirname "$OUT")"
"$PY" - "http://127.0.0.1:$PORT" "$QUERY" "$OUT" <<'EOF'
import io, sys
from PIL import Image
from playwright.sync_api import sync_playwright

url, query, out = sys.argv[1:]
args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
    page = b.new_page(viewport={"width": 1200, "height": 860})
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('info').textContent.includes('images')")
    page.select_option("#k", "20")
    page.fill("#query", query)
    page.press("#query", "Enter")
    page.wait_for_selector("#results .card img")
    page.wait_for_function("[...document.querySelectorAll('#results .card img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    png = page.screenshot(full_page=False)
    n = page.locator("#results .card").count()
    b.close()
# palette PNG keeps the page crisp and the file small enough to commit
img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                           dither=Image.Dither.FLOYDSTEINBERG)
img.save(out, optimize=True)
import os
print(f"{n} results; wrote {out} ({os.path.getsize(out) // 1024} KiB)")
EOF
