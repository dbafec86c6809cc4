"""A width-8 model on a small generated, learnable dataset: the whole main job, small and quick.

    python -m fer_jax.main --config=configs/synthetic.py --workdir=/tmp/fer_synthetic

For smoke tests and for trying the tool without the datasets: trains, evaluates (public and
private test), checkpoints, then runs a short 5-fold cross-validation on synthetic data, with
the same code paths as the real configs. Accepts the same ablation argument as fer2013.py.
"""

import ml_collections

from configs import fer2013


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = fer2013.get_config(arg)
    config.dataset = "synthetic"
    config.synthetic = ml_collections.ConfigDict(
        {"train": 448, "public_test": 70, "private_test": 70, "noise": 0.25}
    )
    config.model.width = 8
    config.model.dropout_rate = 0.0
    config.num_epochs = 4
    config.batch_size = 32
    config.eval_batch_size = 32
    config.optimizer.learning_rate = 0.05
    config.optimizer.schedule = "cosine"
    config.log_every_steps = 7
    config.keep_checkpoints = 2

    cv = config.jaffe
    cv.dataset = "synthetic"
    cv.synthetic = ml_collections.ConfigDict(
        {"train": 70, "public_test": 0, "private_test": 0, "noise": 0.25}
    )
    cv.model = config.model
    cv.num_epochs = 2
    cv.fold_protocol = "random"  # one protocol keeps the tryout short; 'both' runs the two
    cv.batch_size = 16
    cv.eval_batch_size = 32  # the same eval program as the main run: compiled once
    cv.optimizer.learning_rate = 0.01
    return config
