"""CLIP beyond the vision tower: model (text tower, CLIPModel, contrastive loss, zero-shot) and
train (contrastive training on the shapes world; `python -m minivlm.clip`). A side lesson.
"""
