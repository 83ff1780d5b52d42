#!/usr/bin/env bash
# bench/h200/make_kit.sh - build the kit that bench/h200/run.sh needs on the GPU machine (which has no internet):
#
#   bash bench/h200/make_kit.sh [KIT]     # default .devkit in the repository root; ~30 s, ~24 MiB
#
# Needs the harness (shared/harness/real_kohya.sh setup done: its sd-scripts mirror, tokenizers and venv),
# pip with access to the package index, and KIT listed in .git/info/exclude (it is carried, not committed).
# The wheels are the versions the harness venv runs sd-scripts @48d368fa with (transformers 4.x: sd-scripts at
# that commit predates transformers 5), for CPython 3.12 manylinux x86_64 (the device's python); pip checks
# every wheel's tags against 3.12 before the kit is accepted.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
KIT=${1:-.devkit}
HARNESS=${HARNESS:-$(cd ../shared/harness 2>/dev/null && pwd || echo /work/shared/harness)}
eval "$(bash "$HARNESS/real_kohya.sh" env)"
MIRROR=${KH_MIRROR:-/work/.mirror/kohya-ss+sd-scripts/repo}
COMMIT=48d368fa557731ad0488c07304dfeba8c07910eb
WHEELS=(transformers==4.54.1 tokenizers==0.21.4 huggingface-hub==0.34.3 accelerate==1.6.0 diffusers==0.32.1
        importlib_metadata==10.2.0 toml==0.10.2 voluptuous==0.15.2 imagesize==1.4.1
        watchdog==7.1.0 platformdirs==4.14.9 tomli-w==1.2.0)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
TAGS=(--only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}")

rm -rf "$KIT" && mkdir -p "$KIT/whl" "$KIT/tokenizers" "$KIT/sd-scripts" "$KIT/data"
python3 -m pip download -q --no-deps "${TAGS[@]}" -d "$KIT/whl" "${WHEELS[@]}" 2>&1 | grep -v '^WARNING' || true
[ "$(ls "$KIT"/whl/*.whl | wc -l)" -eq "${#WHEELS[@]}" ] || { echo "make_kit: expected ${#WHEELS[@]} wheels" >&2; exit 1; }
# The tag check: pip refuses a wheel that is not for CPython 3.12 on these platforms.
python3 -m pip install -q --dry-run --no-deps --no-index "${TAGS[@]}" --target /tmp/make_kit_tagcheck "$KIT"/whl/*.whl

# Only what train_network.py / sdxl_train_network.py import (the full tree holds Windows DLLs and docs; the
# mirror lacks some of those blobs, so git prints "invalid object" for them and archives the rest).
git --git-dir="$MIRROR" archive "$COMMIT" -- train_network.py sdxl_train_network.py library networks LICENSE.md \
  requirements.txt setup.py | tar -x -C "$KIT/sd-scripts"
cp -r "$KH_TOK_CACHE"/. "$KIT/tokenizers/"
cp "$HARNESS/make_random_sd15.py" "$HARNESS/make_dataset.py" "$KIT/"
tmp=$(mktemp -d)
"$KH_PY" "$HARNESS/make_dataset.py" "$tmp" --count 20 --base 512 --repeats 1 --resolution 512 >/dev/null
cp "$tmp"/img/*/*.png "$KIT/data/" && rm -rf "$tmp"
(cd "$KIT" && { echo "sd-scripts $COMMIT"; sha256sum whl/*.whl; }) > "$KIT/MANIFEST.txt"
du -sh "$KIT"/*; du -sh "$KIT"
