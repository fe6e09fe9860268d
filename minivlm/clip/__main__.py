"""python -m minivlm.clip: train CLIP on the shapes world and score it zero-shot."""
import sys

from .train import main

sys.exit(main())
