"""minivlm: a minimal, readable vision-language model (CLIP ViT + projector + MiniMind decoder).

Read the files in this order to follow one image from pixels to the answer:
config -> processing -> vision -> projector -> tokenizer -> prompt -> lm -> vlm -> generate.
Around that path: checkpoint/weights (files), data/train (training), evaluate/scoring, inference
(eval_vlm.py), shapes/synthetic (the offline world), clip/clip_train, bench, and common (plumbing).
"""

__version__ = "0.1.0"
