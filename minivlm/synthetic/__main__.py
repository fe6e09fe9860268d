"""python -m minivlm.synthetic: write the shapes world as files (or draw a preview grid)."""
import sys

from .dataset import main

sys.exit(main())
