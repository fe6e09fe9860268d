"""The synthetic shapes world, the offline training ground: world (scenes, rendering, captions,
questions), dataset (files or on-the-fly samples; `python -m minivlm.synthetic`), scoring (exact
match by question type), attention (attention supervision, a training signal only this world has),
training (the hook that plugs the world into the training loop).
"""
