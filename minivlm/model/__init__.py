"""The model, in reading order: config -> vision (CLIP ViT) -> projector -> lm (MiniMind decoder) -> vlm
(placeholder runs, splice, loss). weights reads and writes tensor files by hand; checkpoint loads and
saves whole VLMs in MiniMind-V's layouts.
"""
