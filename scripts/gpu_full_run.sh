#!/usr/bin/env bash
# The long measurements for a CUDA machine, in one go: the published `training.evaluate --full` run, the
# accelerators table at 1000 samples (`training.accelerators`)
# (fills priced by their CPU N: see `--n-device` in `python -m training.evaluate --help`) and the Dash/Dot
# latency and Dot training throughput on the SD1.5 shape. Results go to $OUT (default reports/gpu): at most 8 files
# come back from a lent machine, so the log holds the GPU line and the markdown table is re-rendered from the JSON
# (`python -m training.evaluation.report evaluation.json`); the run records come back packed per sampler
# (`--import-records` analyses them again elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } | tee "$OUT/evaluate_full.log"
start=$(date +%s)
"$PY" -m training.evaluate --quick --device cuda --out-dir /tmp/quick --runs /tmp/quick-runs >/tmp/quick.log 2>&1 \
  || { tail -30 /tmp/quick.log; exit 1; }
echo "quick check on cuda: ok ($(( $(date +%s) - start )) s)"
"$PY" -m training.evaluate --full --device cuda --n-device cpu --threads 1 --out-dir "$OUT" --runs /tmp/eval-runs \
  --export "$OUT/records" 2>&1 | grep -v "^evaluate:" | tee -a "$OUT/evaluate_full.log"
rm -f "$OUT/evaluation.md"
echo "full evaluation: $(( $(date +%s) - start )) s"
"$PY" -m training.bench_latency --arch sd15 --device cuda --dtype fp16 --m 1,2,3 --repeats 10 --warmup 3 \
  --train-steps 10 --train-batch 4 --fills inherit_k1,inherit_k2,forecast_k1,forecast2_k2,propagate,feature_dot --json "$OUT/bench_latency_gpu_sd15.json" \
  2>&1 | tail -20 | tee -a "$OUT/evaluate_full.log"
# the feature Dot's rollout training on the SD1.5 shape: seconds a step and peak memory for runs of 8 steps
"$PY" -m training.bench_latency --arch sd15 --device cuda --dtype fp16 --m 2 --repeats 3 --warmup 1 \
  --train-steps 5 --train-batch 1 --train-layout feature --train-run-steps 8 --json "$OUT/bench_rollout_gpu_sd15.json" \
  2>&1 | tail -4 | tee -a "$OUT/evaluate_full.log"
# every accelerator on one table at the published size (issue 28): 1000 samples, fills priced on the GPU
"$PY" -m training.accelerators --samples 1000 --grid full --device cuda --threads 1 --out-dir "$OUT" \
  2>&1 | grep -v "run/s" | tail -40 | tee -a "$OUT/evaluate_full.log"
echo "all done: $(( $(date +%s) - start )) s"
