"""`python -m fer_jax.export --checkpoint=... --out_dir=...`: the command of
`fer_jax.inference.export`."""

import sys

from fer_jax.inference.export import main

if __name__ == "__main__":
    sys.exit(main())
