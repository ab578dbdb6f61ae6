import sys

from qwen2_jax.demo import main

sys.exit(main())
