"""`python -m minivlm.probe`: look inside a shapes-world model. A command shim only: the code is in `minivlm/lab/probe.py`."""
import sys

from .lab.probe import main

if __name__ == "__main__":
    sys.exit(main())
