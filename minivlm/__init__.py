"""minivlm: a minimal, readable vision-language model (CLIP ViT + projector + MiniMind decoder).

Read the files in this order to follow one image from pixels to the answer:
config -> processing -> vision -> projector -> lm -> vlm -> checkpoint.
"""

__version__ = "0.1.0"
