"""Config sections shared by `fer2013.py` and `jaffe.py` (model, loss, optimizer, run fields).

Both configs import this module; `fer2013.py` also imports `jaffe.py` (the cross-validation
stage it may run), and `fer2013_cpu.py` and `synthetic.py` start from `fer2013.py`.
"""

import ml_collections


def parse_arg(arg: str | None) -> dict[str, str]:
    """'cbam=none,head=softmax' -> {'cbam': None, 'head': 'softmax'}."""
    out = {"cbam": "channel_first", "head": "a_softmax"}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in out:
            raise ValueError(f"config argument {item!r}: expected cbam=... or head=...")
        out[key] = value
    if out["cbam"].lower() == "none":
        out["cbam"] = None
    return out


def model_config(cbam: str | None, head: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "num_classes": 7,
            "width": 64,
            "cbam": cbam or "none",  # 'none' is the plain ResNet18 baseline
            "head": head,
            # The reference FER ResNet18's dropout before the classifier (paper: not stated).
            "dropout_rate": 0.5,
            # 'auto': CPU-fast forms (Winograd, matmul weight gradients) on CPU, XLA's on GPU.
            "conv_impl": "auto",
            # Operands of those forms' matmuls: 'float32', 'bfloat16' (float32 accumulation), or
            # 'auto': bfloat16 on a CPU with AMX-BF16 or AVX512-BF16 (resnet.matmul_bf16).
            # float32 here: exact parity with the PyTorch reference; the CPU recipe
            # (configs/fer2013_cpu.py) takes 'auto'.
            "matmul_dtype": "float32",
        }
    )


def loss_config() -> ml_collections.ConfigDict:
    """A-Softmax margin m and lambda annealing.

    SphereFace's schedule `max(lambda_min, lambda_base * (1 + lambda_gamma * t) ** -lambda_power)`
    with its constants, but t counted in epochs, not steps. Per step (SphereFace, the PyTorch
    port: `lambda_per='step'`) lambda is at 5 after ~7 FER2013 epochs, and this network (whose
    features are post-ReLU) then drives its feature norm |x| to 0: loss -> log 7, the final
    ReLUs die, training stops (H200: 36.0% PrivateTest at best, epoch 69 of 148,
    experiments/results/gpu_run_h200/; CPU, width 16, lambda fixed at 5: |x| 1.17 -> 0.0013 in
    steps 100-400). Per epoch, lambda falls from 1500 to 48 at epoch 300, a value at which
    training from scratch still learns (experiments/results/asoftmax_collapse/).
    """
    return ml_collections.ConfigDict(
        {
            "margin": 4,
            "lambda_base": 1500.0,
            "lambda_gamma": 0.1,
            "lambda_power": 1.0,
            "lambda_min": 5.0,
            "lambda_per": "epoch",  # or 'step' (SphereFace), or 'run' (see lambda_run_epochs)
            # lambda_per='run': the per-epoch curve of a run this long, compressed into the
            # run's own num_epochs (300: a short run ends at the reference recipe's lambda).
            "lambda_run_epochs": 300.0,
        }
    )


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    """Reference recipe: SGD 0.9, wd 5e-4, clip 0.1, lr 0.01 x0.9 every 5 epochs after 80."""
    fields = {
        "name": "sgd",  # or 'adamw'
        "learning_rate": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "grad_clip": 0.1,  # element-wise; <= 0 disables
        "schedule": "step",  # 'step', 'cosine' or 'constant'
        "decay_start_epoch": 80,
        "decay_every_epochs": 5,
        "decay_rate": 0.9,
        "warmup_epochs": 0.0,
    }
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def run_fields(config: ml_collections.ConfigDict) -> None:
    """Fields every training config has: data source, input pipeline, parallelism, precision."""
    config.seed = 0
    # Replicas: K independent runs of the same network in one compiled program (vmapped over a
    # leading replica axis of the train state). Replica k uses seed `seed + k` unless
    # `replica_seeds` lists K seeds; `replica_overrides` may list K dicts of scalar fields
    # (`fer_jax.training.replicas.OVERRIDABLE`, e.g. {'optimizer.learning_rate': 0.02}) per replica.
    config.replicas = 1
    config.replica_seeds = ()
    config.replica_overrides = ()
    # How the steps run over replicas: 'vmap' (one batched program) or 'unroll' (K copies of
    # the step in one program); '' = per platform: vmap on GPU/TPU, unroll on CPU (XLA:CPU's
    # vmapped, i.e. grouped, convolutions: 0.57x the aggregate speed of K = 1 at K = 4,
    # unrolled 0.91x; experiments/results/replicas_cpu/).
    config.replica_map = ""
    # 'tfds': the TFDS builders (needs tensorflow-datasets; data_dir, and manual_dir to build);
    # 'files': the publisher's files in manual_dir read directly (no TensorFlow needed).
    config.data_source = "tfds"
    config.data_dir = ""  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets)
    config.manual_dir = ""  # the downloaded files; 'tfds' builds from them first if needed
    config.normalize = "unit"  # pixels / 255
    # Training crops beyond the random 44x44 window and flip (data_pipelines.plan), off at 0:
    # scale uniform in [1 - zoom, 1 + zoom] (> 1 zooms out) and angle in [-rotate, rotate] deg;
    # `erase`: probability of blanking a random box of each crop (torchvision's RandomErasing).
    config.augment = ml_collections.ConfigDict({"zoom": 0.0, "rotate": 0.0, "erase": 0.0})
    # Exponential moving average of the weights and BatchNorm statistics, decay per step
    # (0: none). With it, selection, the report, checkpoints read for inference, export and
    # `init_from` all use the average (fer_jax.training.step.ema_view).
    config.ema_decay = 0.0
    # 'device': the uint8 training set lives on the accelerator(s), each epoch's crops and
    # flips are gathered there and `steps_per_dispatch` steps run per call (lax.scan);
    # 'tf_data': tf.data feeds one batch per step. '' = 'device': the fast path on an H200, and
    # as fast as tf.data on CPU (0.99x, within noise: experiments/results/input_pipeline_cpu/).
    config.input_pipeline = ""
    # Device mode; calls also end at epoch ends and checkpoints. 0 = per platform: 64 on
    # GPU/TPU (launch-bound at batch 64), 1 on CPU (width 16: 11-15 images/s at 8 steps a call,
    # 85-90 at one; experiments/results/input_pipeline_cpu/NOTES.md).
    config.steps_per_dispatch = 0
    config.half_precision = False  # bf16 compute; params/optimizer/BN stats stay float32
    config.parallelism = "shard_map"  # or 'pmap'; one device uses plain jit either way
    config.cross_device_bn = True  # BatchNorm statistics over the global batch
    config.peak_tflops = 0.0  # > 0: the device's peak for MFU; 0: look it up by device kind
