"""``python -m bench.ttft``: the TTFT benchmark (see bench/ttft/README.md)."""
import sys

from .bench import main

sys.exit(main())
