"""Training and evaluating the model: `train.train_and_evaluate(config, workdir)` and what it
is made of (the step and its state, the input on the devices, the options that wrap them:
data parallelism, replicas, tf.data; checkpoints, run guards, metrics and reports, JAFFE
cross-validation)."""
