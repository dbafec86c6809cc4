"""`python -m fer_jax.export --checkpoint=... --out_dir=...`: the classifier as StableHLO
(and optionally a TF SavedModel or TFLite file), to run without this package.

The command's code is `fer_jax.inference.export` (`--help` lists its options).
"""

import sys

from fer_jax.inference.export import main

if __name__ == "__main__":
    sys.exit(main())
