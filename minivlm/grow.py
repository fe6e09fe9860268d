"""`python -m minivlm.grow`: add identity decoder blocks to a trained model. A command shim only: the code is in `minivlm/lab/grow.py`."""
import sys

from .lab.grow import main

if __name__ == "__main__":
    sys.exit(main())
