"""JAFFE 5-fold cross-validation, fine-tuned from a FER2013 model (the paper: 30 epochs per fold).

    python -m fer_jax.main --mode=cross_validate --config=configs/jaffe.py \
        --workdir=runs/jaffe --config.init_from=pretrained \
        --config.data_source=files --config.manual_dir=/path/to/jaffedbase

`init_from`: `pretrained` (the shipped model), a FER2013 run or one of its checkpoints.
`configs/fer2013.py` runs this automatically after FER2013 training (`cross_validate=True`),
from the FER2013 run's best checkpoint. The model fields, A-Softmax's margin and lambda here are
defaults only: the fine-tuning takes them from the model it starts from (lambda held where its
training ended) unless the command line sets them (`fer_jax.training.cross_validate`);
`--mode=check` prints what it takes and the fold plans.

`fold_protocol='both'` (the default) runs the paper's random folds and the subject-independent
folds, each in its own sub-workdir (`WORKDIR/random/`, `WORKDIR/subject/`, each resuming on its
own), and `WORKDIR/summary.json` gives both side by side (the random folds' figures at its top
level, each protocol's under `protocols`); `'random'` or `'subject'` runs one protocol, its folds
in `WORKDIR/fold_<k>/` as before.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    choice = common.parse_arg(arg)
    config = ml_collections.ConfigDict()
    common.run_fields(config)
    config.dataset = "jaffe"
    config.model = common.model_config(choice["cbam"], choice["head"])
    config.loss = common.loss_config()
    # Fine-tuning: a small constant learning rate on ~170 training images per fold.
    config.optimizer = common.optimizer_config(learning_rate=0.001, schedule="constant")
    config.num_epochs = 30
    config.batch_size = 16
    config.eval_batch_size = 64
    config.log_every_steps = 20
    config.eval_every_epochs = 0  # no per-epoch evaluation: the held-out fold is the test
    config.checkpoint_every_epochs = 1
    config.checkpoint_every_steps = 0
    config.keep_checkpoints = 2
    config.init_from = ""  # required: the FER2013 run (workdir or checkpoint)
    config.folds = 5
    # 'both': 'random' (the paper's, stratified by label) and 'subject' (subject-independent),
    # each in its own sub-workdir; or one of them alone.
    config.fold_protocol = "both"
    return config
