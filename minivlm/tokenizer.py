"""`python -m minivlm.tokenizer`: train a byte-level BPE tokenizer. A command shim only: the code is in `minivlm/data/tool.py`."""
import sys

from .data.tool import tokenizer_main as main

if __name__ == "__main__":
    sys.exit(main())
