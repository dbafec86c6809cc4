#!/bin/bash
# Cycle 8: one 16-epoch warm-up + cosine continuation from cycle 7's shipped weights (sha256
# f2e142d90b34..., copied to cycle7_weights/), same recipe as cycle 7 (configs/fer2013_cpu.py's
# defaults: zoom/rotate, erasing 0.5, EMA 0.999; lambda 48). Worktree code8 = 3381d14.
# Resume: run this script again (same workdir).
cd /var/tmp/fer_jax-runs/code8
exec nice -n 4 python -m fer_jax.main --config=configs/fer2013_cpu.py \
  --workdir=/var/tmp/fer_jax-runs/fer2013_cpu_cycle8 \
  --config.data_source=files --config.manual_dir=/var/tmp/fer_jax-runs/data \
  --config.init_from=/var/tmp/fer_jax-runs/cycle7_weights/cbam_resnet18_fer2013.npz --config.num_epochs=16 \
  --config.optimizer.learning_rate=0.01 --config.optimizer.warmup_epochs=0.5 \
  --config.loss.lambda_base=48 --config.loss.lambda_min=48 --config.log_every_steps=25
