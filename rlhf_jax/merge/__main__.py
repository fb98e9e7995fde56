"""``python -m rlhf_jax.merge``: see :mod:`rlhf_jax.merge.cli`."""

import sys

from rlhf_jax.merge.cli import main

if __name__ == "__main__":
  sys.exit(main())
