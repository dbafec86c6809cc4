#!/usr/bin/env bash
# A-Softmax lambda schedules vs the softmax head on one GPU: the runs that settle the default.
#
#   experiments/asoftmax_sweep.sh COMPACT OUT [EPOCHS] [BUDGET_S_PER_RUN]
#
# COMPACT: fer2013-compact.bin.xz (see ../shared/data/README.md; restore_csv.py next to it).
# Each run is experiments/gpu_run.py (bf16, batch 64, the paper recipe otherwise) for EPOCHS
# (default 30), evaluated every 5 epochs, inside BUDGET_S_PER_RUN (default 150 s), written to
# OUT/<name>/. About 2 s per epoch on an H200 plus ~60 s of start-up and compiles per run.
#   softmax           head=softmax: the control (64.98% PrivateTest after ~21 epochs, H200)
#   per_step          SphereFace's per-step lambda (floor 5 after ~7 epochs): the collapse
#   per_epoch         the default: lambda 1500 / (1 + 0.1 epoch), 375 at epoch 30
#   per_epoch_fast    the default's whole 300-epoch lambda range compressed into EPOCHS
#                     (gamma 10 / EPOCHS: lambda 48 at the end), to see the late phase early
# The CSV is restored once and reused. Extra gpu_run flags for every run go in $GPU_RUN_ARGS,
# e.g. a CPU smoke test:
#   GPU_RUN_ARGS="--width=8 --dtype=float32 --max_train_steps=4 --steps_per_call=2
#     --max_eval_examples=64" experiments/asoftmax_sweep.sh COMPACT /tmp/sweep 1 300
set -euo pipefail

compact=${1:?usage: $0 COMPACT OUT [EPOCHS] [BUDGET_S_PER_RUN]}
out=${2:?usage: $0 COMPACT OUT [EPOCHS] [BUDGET_S_PER_RUN]}
epochs=${3:-30}
budget=${4:-150}
data_dir=${TMPDIR:-/tmp}/fer2013_asoftmax_sweep
fast_gamma=$(python3 -c "print(10.0 / $epochs)")

run() {
  local name=$1
  shift
  local source=(--compact="$compact" --data_dir="$data_dir")
  if [[ -f $data_dir/fer2013.csv ]]; then
    source=(--csv="$data_dir/fer2013.csv")
  fi
  echo "=== $name: $*"
  python3 -m experiments.gpu_run "${source[@]}" --epochs="$epochs" --budget_s="$budget" \
    --eval_every=5 --eval_private=on_improvement --tencrop_reps=1 --out="$out/$name" \
    ${GPU_RUN_ARGS:-} "$@"
}

run softmax --config_arg=head=softmax
run per_step --set loss.lambda_per=step
run per_epoch
run per_epoch_fast --set loss.lambda_gamma="$fast_gamma"
for name in softmax per_step per_epoch per_epoch_fast; do
  python3 - "$out/$name/summary.json" "$name" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
last, sel = s["history"][-1], s["selected"] or {}
print(f"{sys.argv[2]:>15}: PrivateTest {sel.get('private_test_accuracy')} at epoch "
      f"{sel.get('epoch')} (chosen on PublicTest); last epoch {last['epoch']}: train loss "
      f"{last['train_loss']:.4f}, acc {last['train_accuracy']:.4f}, |x| {last['feature_norm']:.3g}")
EOF
done
