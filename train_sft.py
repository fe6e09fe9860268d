"""Stage 2 — instruction-tune projector + decoder (CLIP frozen unless --train-vision). `python train_sft.py --help`."""
import sys

from minivlm.train.loop import main

if __name__ == "__main__":
    sys.exit(main("sft"))
