#!/bin/bash
# Cycle 10: a 4-epoch warm-up + cosine continuation from cycle 7's shipped weights (sha256
# f2e142d90b34..., copied to cycle7_weights/), peak lr 0.004, sized to one session on a 2-core
# AMD EPYC Zen 3 (float32, ~16.6 images/s). Cycles 8-9's run directories went with their machine.
# Worktree code10 = 2e57168. Resume: run this script again (same workdir).
cd /var/tmp/fer_jax-runs/code10
exec nice -n 4 python -m fer_jax.main --config=configs/fer2013_cpu.py \
  --workdir=/var/tmp/fer_jax-runs/fer2013_cpu_cycle10 \
  --config.data_source=files --config.manual_dir=/var/tmp/fer_jax-runs/data \
  --config.init_from=/var/tmp/fer_jax-runs/cycle7_weights/cbam_resnet18_fer2013.npz --config.num_epochs=4 \
  --config.optimizer.learning_rate=0.004 --config.optimizer.warmup_epochs=0.25 \
  --config.loss.lambda_base=48 --config.loss.lambda_min=48 --config.log_every_steps=25
