"""The paper's recipe: CBAM-ResNet18 + A-Softmax on FER2013, then 5-fold CV on JAFFE.

    python -m fer_jax.main --config=configs/fer2013.py --workdir=runs/fer2013 \
        --config.data_dir=~/tensorflow_datasets --config.manual_dir=/path/to/fer2013_files

The config argument selects the paper's ablations (Tables 1 and 2), e.g.
`--config=configs/fer2013.py:cbam=none,head=softmax` (plain ResNet18 + softmax) or
`--config=configs/fer2013.py:cbam=parallel`. Every field can be overridden with
`--config.FIELD=VALUE` (e.g. `--config.num_epochs=5 --config.model.width=16`).
"""

import ml_collections

from configs import common, jaffe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    choice = common.parse_arg(arg)
    config = ml_collections.ConfigDict()
    common.run_fields(config)
    config.dataset = "fer2013"  # 'fer2013', 'jaffe' or 'synthetic'
    config.model = common.model_config(choice["cbam"], choice["head"])
    config.loss = common.loss_config()
    # Reference recipe: SGD 0.9, wd 5e-4, clip 0.1, lr 0.01 x0.9 every 5 epochs after 80.
    config.optimizer = common.optimizer_config()
    config.num_epochs = 300
    config.batch_size = 64  # global, over all devices
    config.eval_batch_size = 128
    config.log_every_steps = 100
    config.eval_every_epochs = 1
    config.select_crops = 10  # crops of the selection evaluation: 10, or 1 (centre; CPU runs)
    config.checkpoint_every_epochs = 1
    config.checkpoint_every_steps = 0  # > 0: also mid-epoch
    config.keep_checkpoints = 3
    config.init_from = ""  # another run's workdir/checkpoint: params + BN stats, fresh optimizer
    config.train_split = "train"
    config.select_split = "public_test"  # model selection (best checkpoint)
    config.report_split = "private_test"  # the reported figure, for the selected model
    config.cross_validate = True  # after training, fine-tune on JAFFE (configs/jaffe.py)
    config.jaffe = jaffe.get_config()
    return config
