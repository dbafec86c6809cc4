#!/bin/bash
# After cycle 7 ends (its workdir has results.json): ship it only if its PublicTest centre-crop
# selection accuracy (EMA) beats the shipped cycle-6 model's 66.76% by >= 0.5 points (rule set
# before the run ended), then choose its class-prior adjustment on PublicTest.
set -euo pipefail
RUN=/var/tmp/fer_jax-runs/fer2013_cpu_cycle7
cd /work/main
python3 - "$RUN" <<'PY'
import json, sys
p = f"{sys.argv[1]}/results.json"
r = json.load(open(p))
a = r["select_accuracy"]
print("cycle 7 PublicTest centre crop (EMA):", a, "epoch", r.get("selected_epoch"))
if a < 0.6726:
    sys.exit(3)
# code7 (88dd4e9) predates results.json's matmul_dtype_resolved; the run trained with 'auto'
# resolved to bfloat16 on this AVX512_BF16 CPU.
r.setdefault("matmul_dtype_resolved", "bfloat16")
json.dump(r, open(p, "w"), indent=1)
PY
python -m experiments.model_card --run=$RUN --manual_dir=/var/tmp/fer_jax-runs/data \
  --out=experiments/results/fer2013_cpu_cycle7_epyc_zen5 \
  --weights=fer_jax/weights/cbam_resnet18_fer2013.npz \
  --peers=experiments/results/peers_cycle6_epyc_zen5 --skip float32:public_test:10 \
  --train_command="python -m fer_jax.main --config=configs/fer2013_cpu.py --workdir=$RUN --config.data_source=files --config.manual_dir=/var/tmp/fer_jax-runs/data --config.init_from=pretrained --config.num_epochs=16 --config.optimizer.learning_rate=0.01 --config.optimizer.warmup_epochs=0.5 --config.loss.lambda_base=48 --config.loss.lambda_min=48 --config.log_every_steps=25"
python -m experiments.logit_adjustment --manual_dir=/var/tmp/fer_jax-runs/data --write_manifest \
  --out=experiments/results/logit_adjustment_cycle7_epyc_zen5
