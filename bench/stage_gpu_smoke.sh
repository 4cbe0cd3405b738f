#!/usr/bin/env bash
# Stage what bench/gpu_smoke.py needs on the device (one GPU, torch + transformers, no package
# registry, at most 64 MiB carried per call) into git-ignored folders under bench/.device/:
#   wheels/  DeepSpeed's pure-Python wheel and the small packages it and sd2_ray need that torch
#            and transformers do not bring, for CPython 3.12 on manylinux x86_64
#   site/    those wheels installed with `pip install --no-index --no-deps --target`
#   kit/     the model kit's target, drafter and prompts (KIT=dir, default: sd2's cached kit)
# Then one device call:
#   run(command="PYTHONPATH=bench/.device/site python bench/gpu_smoke.py --kit bench/.device/kit
#                --json $OUT/smoke.json", carry=["bench/.device/site", "bench/.device/kit"], timeout_s=540)
# pyarrow (larger than the whole budget) is not staged: the smoke uses a local stand-in for it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=bench/.device
TARGET_PY=${TARGET_PY:-3.12}
ABI=cp${TARGET_PY/./}
# the versions this checkout is tested with (pydantic and pydantic-core must match each other)
PACKAGES="deepspeed hjson py-cpuinfo einops msgpack ninja psutil pydantic pydantic-core annotated-types
          typing-inspection typing-extensions"
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform any)
TAGS=(--python-version "$TARGET_PY" --implementation cp --abi "$ABI" --abi abi3 --abi none "${PLATFORMS[@]}")

rm -rf "$DEST/wheels" "$DEST/site" "$DEST/kit"
mkdir -p "$DEST/wheels"
for name in $PACKAGES; do
  spec="$name==$(version "$name")"
  if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: "${TAGS[@]}" -d "$DEST/wheels" "$spec"; then
    [ "$name" = deepspeed ] || { echo "stage_gpu_smoke: no $TARGET_PY wheel of $spec" >&2; exit 2; }
    # PyPI ships DeepSpeed as a source archive: build its pure-Python wheel (no ops compiled)
    DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST/wheels" "$spec"
  fi
done
"$PY" -m pip install --quiet --no-index --no-deps --only-binary=:all: "${TAGS[@]}" --target "$DEST/site" \
  "$DEST"/wheels/*.whl
# bytecode and the DeepSpeed op sources the smoke never builds stay here
find "$DEST/site" -name __pycache__ -prune -exec rm -rf {} +

KIT=${KIT:-$("$PY" -c "from sd2_ray.kit import ensure_kit; print(ensure_kit())")}
mkdir -p "$DEST/kit"
cp -r "$KIT/target" "$KIT/drafter" "$KIT/prompts" "$DEST/kit/"
[ -f "$KIT/kit.json" ] && cp "$KIT/kit.json" "$DEST/kit/"

size_kib=$(du -sk "$DEST/site" "$DEST/kit" | awk '{s += $1} END {print s}')
echo "stage_gpu_smoke: staged $(ls "$DEST/wheels" | wc -l) wheels and the kit: $((size_kib / 1024)) MiB to carry"
if [ "$size_kib" -gt $((60 * 1024)) ]; then
  echo "stage_gpu_smoke: $((size_kib / 1024)) MiB is over the 60 MiB a device call may carry (64 MiB limit)" >&2
  exit 2
fi
