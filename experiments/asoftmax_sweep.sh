#!/usr/bin/env bash
# A-Softmax lambda schedules vs the softmax head on one GPU: the runs that settle the default.
#
#   experiments/asoftmax_sweep.sh DATA OUT [EPOCHS]
#
# DATA: fer2013-compact.bin.xz (../shared/data/README.md), restored once with the restore_csv.py
# next to it into $DATA_DIR (default ${TMPDIR:-/tmp}/fer2013_asoftmax_sweep) and reused; or a
# directory that already holds fer2013.csv. Each variant is one `python -m fer_jax.main` run
# (configs/fer2013.py: the paper recipe, batch 64; data read from the CSV, the training set on
# the device, bf16) for EPOCHS (default 30), PublicTest evaluated every 5 epochs, no JAFFE
# cross-validation, in OUT/<name>/, then `python -m experiments.run_summary OUT/<name>`
# (summary.md: images/s, MFU, PrivateTest of the epoch chosen on PublicTest). Runs resume from
# their checkpoints: the same command again finishes an interrupted sweep.
#   softmax           head=softmax: the control (64.98% PrivateTest after ~21 epochs, H200)
#   per_step          SphereFace's per-step lambda (floor 5 after ~7 epochs): the collapse
#   per_epoch         the default: lambda 1500 / (1 + 0.1 epoch), 375 at epoch 30
#   per_epoch_fast    the default's whole 300-epoch lambda range compressed into EPOCHS
#                     (gamma 10 / EPOCHS: lambda 48 at the end), to see the late phase early
# Extra fer_jax.main flags for every run go in $MAIN_ARGS (they come last, so they win), e.g. a
# CPU smoke test (width 8, float32, a tiny generated CSV):
#   python3 -c "from data_pipelines import synthetic as s; r = s.fer2013_rows((64, 16, 16));
#     s.write_fer2013('/tmp/fer_tiny', s.fer2013_csv_text(r['images'], r['labels'], r['usages']))"
#   MAIN_ARGS="--config.model.width=8 --config.half_precision=False --config.batch_size=16
#     --config.eval_batch_size=16 --config.steps_per_dispatch=2" \
#     experiments/asoftmax_sweep.sh /tmp/fer_tiny /tmp/sweep 1
set -euo pipefail

usage="usage: $0 DATA OUT [EPOCHS]"
data=${1:?$usage}
out=${2:?$usage}
epochs=${3:-30}
fast_gamma=$(python3 -c "print(10.0 / $epochs)")

if [[ -d $data ]]; then
  data_dir=$data
else
  data_dir=${DATA_DIR:-${TMPDIR:-/tmp}/fer2013_asoftmax_sweep}
  if [[ ! -f $data_dir/fer2013.csv ]]; then
    python3 "$(dirname "$data")/restore_csv.py" "$data" "$data_dir"
  fi
fi

run() {
  local name=$1 config=$2
  shift 2
  echo "=== $name: $config $*"
  # shellcheck disable=SC2086  # MAIN_ARGS is a list of flags
  python3 -m fer_jax.main --config="$config" --workdir="$out/$name" \
    --config.data_source=files --config.manual_dir="$data_dir" \
    --config.input_pipeline=device --config.half_precision=True \
    --config.num_epochs="$epochs" --config.cross_validate=False --config.eval_every_epochs=5 \
    "$@" ${MAIN_ARGS:-}
  python3 -m experiments.run_summary "$out/$name" >/dev/null
}

names=(softmax per_step per_epoch per_epoch_fast)
run softmax configs/fer2013.py:head=softmax
run per_step configs/fer2013.py --config.loss.lambda_per=step
run per_epoch configs/fer2013.py
run per_epoch_fast configs/fer2013.py --config.loss.lambda_gamma="$fast_gamma"

python3 - "$out" "${names[@]}" <<'EOF'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
print("| variant | PrivateTest (chosen on PublicTest) | epoch | last train loss | acc | |x| |")
print("|---|---|---|---|---|---|")
for name in names:
    s = json.load(open(f"{out}/{name}/summary.json"))
    last = s["final_train"]
    cells = [last.get(k) for k in ("train_loss", "train_accuracy", "train_feature_norm")]
    acc = s["report_accuracy"]
    print(f"| {name} | {'n/a' if acc is None else f'{100 * acc:.2f}%'} | {s['selected_epoch']} | "
          + " | ".join("n/a" if c is None else f"{c:.4g}" for c in cells) + " |")
EOF
