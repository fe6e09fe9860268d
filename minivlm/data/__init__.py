"""From files to tensors: tokenizer (BPE, special tokens, one-token '@'), prompt (ChatML, image runs,
loss labels), processing (CLIP image preprocessing), dataset (MiniMind-V jsonl samples, collate),
parquet (MiniMind-V's parquet release), tool (`python -m minivlm.data`, tokenizer training).
"""
