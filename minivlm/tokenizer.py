"""`python -m minivlm.tokenizer`: train a byte-level BPE tokenizer. A command shim only: the code is in `minivlm/data/tokenizer.py`."""
import sys

from .data.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
