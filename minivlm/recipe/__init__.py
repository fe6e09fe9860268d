"""The demo model's recipe: one command that makes the shipped shapes model from nothing (data, tokenizer,
pretrain, SFT, held-out scores) with fixed flags, and records its stage times and sha256 beside it.
"""
