"""python -m minivlm.data stats|preview|repack FILE: look at a data file before training."""
import sys

from .tool import main

sys.exit(main())
