"""`python -m qwen2_jax` runs qwen2-generate."""

import sys

from qwen2_jax.cli import main

sys.exit(main())
