"""`python -m train`: the qwen2-train command."""

import sys

from train.cli import main

sys.exit(main())
