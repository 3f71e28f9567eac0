#!/usr/bin/env bash
# The ONE prepared script for a session that is lent a GPU (see ../shared/ENVIRONMENT.md): every GPU
# figure the open trainer/curation issues ask for, as tables, in one run of about 8 minutes.
#
#   Here, once: bash benchmarks/gpu_wheels.sh (the packages the GPU image lacks, at CI's versions, into
#   .gpu/site.tar.xz: about 57 MiB of the 64 a call carries).
#   There: run(command="bash benchmarks/gpu_session.sh", carry=[".gpu"], timeout_s=600)
#   Ray does not fit: the fractional-GPU command is in transnet_vs_decode.py.
#
# Each step prints its own table; a failing step is reported and the next one runs.
set -uo pipefail
if [ -f .gpu/site.tar.xz ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/site.tar.xz \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || echo "unpacking .gpu/site.tar.xz failed"
else
  echo "no .gpu/site.tar.xz (bash benchmarks/gpu_wheels.sh here, then carry .gpu): steps needing pydantic fail"
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
step() { echo; echo "=== $*"; timeout 240 "$@" 2>&1 | grep -v Warning | tee -a "$OUT/tables.txt" || echo "step failed: $*"; }
# issue 14: the default training path (dit_xl.yaml: AC auto, compile per block), then the eager baseline
step python3 benchmarks/dit_mfu.py --steps 8
step python3 benchmarks/dit_mfu.py --steps 8 --ac off --compile off --no-count-flops
# issue 34: the packed step (mixed samples in one sequence, flex_attention compiled) beside the bucketed
# one at the DiT-XL shape, eager (goal: packed MFU >= 0.95x bucketed); compiled blocks in the run above
step python3 benchmarks/dit_mfu.py --steps 6 --packed --compile off --no-count-flops
# issue 14: the 1.3B shape against diffusers' Wan at the same shape, both with the config's policy
step python3 benchmarks/dit_mfu.py --shape wan1.3b --bucket 16x9_360p_128f --reference wan --steps 8
# issue 14: the cached-latent loader against the trainer's consumption (CPU-side, 16 cores there)
step python3 benchmarks/loader_throughput.py --cache --token-budget 65536 --steps 20
# issue 33: TransNetV2 beside the decoder on the GPU (goal: <= 1.3x the bare decode), then CLIP
# aesthetic clips/s at ViT-L-14 (random weights: speed only) against its image tower alone
step python3 benchmarks/transnet_vs_decode.py --device cuda --seconds 60
step python3 benchmarks/aesthetic_throughput.py --device cuda --clips 256
