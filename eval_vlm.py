"""Ask a minivlm (or MiniMind-V) model about images. Works offline out of the box:

    python eval_vlm.py                                   # the shipped demo model on the sample images
    python eval_vlm.py --images photo.jpg --prompt "What colour is the circle?"
    python eval_vlm.py --images a.png b.png --multi --prompt "What does the first image have that the second does not?"
    python eval_vlm.py --chat --images a.png             # multi-turn conversation about one image
    python eval_vlm.py --eval data/test_sft.jsonl        # score held-out questions
    python eval_vlm.py --weights sft_vlm_512.pth --vision clip-vit-base-patch16 --tokenizer minimind_tokenizer \\
                       --prompt "描述一下这个图像的内容。"   # real MiniMind-V weights (2025-04 or 2025-02 layout)

Run with --help for every flag.
"""

import sys

from minivlm.infer.cli import main

if __name__ == "__main__":
    sys.exit(main())
