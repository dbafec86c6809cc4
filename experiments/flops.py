"""FLOPs per image of the network, counted from the model (`fer_jax.model.flops`) and by XLA.

    python -m experiments.flops [--width 64] [--cbam channel_first] [--head a_softmax]

For the paper's CBAM-ResNet18 at 44x44: 2.19 GFLOP forward, 6.58 GFLOP per training image
(analytic, 3 x forward); XLA's cost analysis: 1.99 GFLOP forward (it skips padding taps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments import common
from fer_jax.model.flops import lowered_flops, model_flops_per_image


def main() -> None:
    """Prints the analytic and XLA FLOP counts of one configuration."""
    from configs import fer2013
    from fer_jax.model.resnet import model_from_config

    ap = common.parser(__doc__)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--cbam", default="channel_first")
    ap.add_argument("--head", default="a_softmax")
    args = ap.parse_args()
    cfg = fer2013.get_config(f"cbam={args.cbam},head={args.head}")
    cfg.model.width = args.width
    counts = model_flops_per_image(cfg.model)
    model = model_from_config(cfg.model, conv_impl="xla")
    x = jnp.zeros((8, 44, 44, 1), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], train=False))
    xla = lowered_flops(lambda v, x: model.apply(v, x, train=False), variables, x)
    print(f"width {args.width} cbam={args.cbam} head={args.head} (44x44 input)")
    print(f"analytic forward: {counts['forward'] / 1e9:.3f} GFLOP/image")
    print(f"analytic train (3x forward): {counts['train'] / 1e9:.3f} GFLOP/image")
    if xla is not None:
        print(f"XLA cost analysis, forward: {xla / 8 / 1e9:.3f} GFLOP/image")


if __name__ == "__main__":
    main()
