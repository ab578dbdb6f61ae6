"""`python -m serve` runs qwen2-serve."""

import sys

from serve.cli import main

sys.exit(main())
