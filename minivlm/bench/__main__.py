"""python -m minivlm.bench: the benchmark suite."""
import sys

from .suite import main

sys.exit(main())
