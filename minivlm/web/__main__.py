"""python -m minivlm.web: the local web page that shows where the model looks."""
import sys

from .server import main

sys.exit(main())
