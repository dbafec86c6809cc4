"""Training and evaluating the model: `train.train_and_evaluate(config, workdir)` and what it
is made of (the state and steps, the compiled `Trainer`, the loop and its actions, the input,
devices and replicas, checkpoints, run guards, metrics and reports, JAFFE cross-validation)."""
