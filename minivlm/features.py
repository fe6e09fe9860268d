"""`python -m minivlm.features`: build the frozen vision tower's feature cache. A command shim only: the code is in `minivlm/train/features.py`."""
import sys

from .train.features import main

if __name__ == "__main__":
    sys.exit(main())
