"""Stage 1 — pretrain the projector on image captions (CLIP frozen unless --train-vision). `python train_pretrain.py --help`."""
import sys

from minivlm.train.loop import main

if __name__ == "__main__":
    sys.exit(main("pretrain"))
