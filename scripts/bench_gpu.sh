#!/usr/bin/env bash
# The GPU figures of the README's performance section, on a machine with one CUDA GPU:
# resnet50/layer3 and resnet18/layer3 at 256x256, batch 32, in bf16 and fp32 (worker, pipeline,
# transport with GPU JPEG decode, latency), plus the torch backends (channels_last, fused,
# compile) in fp32. Writes JSON + markdown per run into the folder given (default bench-gpu/).
#   ./scripts/bench_gpu.sh [OUT_DIR] [extra dfm-stream bench options, e.g. --duration 5]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-gpu}"
shift || true
./scripts/setup.sh >&2
.venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible")'
mkdir -p "$out"
for model in resnet50:layer3 resnet18:layer3; do
  backbone="${model%%:*}" layer="${model##*:}"
  for precision in bf16 fp32; do
    stages="backbone,dfm,pipeline,transport,latency"
    [ "$precision" = fp32 ] && stages="$stages,backends"
    name="$backbone-$layer-$precision"
    echo "==> $name" >&2
    .venv/bin/dfm-stream bench --device cuda --backbone "$backbone" --layer "$layer" \
      --image-size 256 --batch-size 32 --precision "$precision" --stages "$stages" \
      --backends channels_last,fused,compile --repeats 3 \
      --out "$out/$name.json" --markdown "$out/$name.md" "$@"
  done
done
echo "wrote $out/*.json and $out/*.md" >&2
