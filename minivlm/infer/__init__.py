"""Answering: generate (KV-cache decoding, sampling), evaluate (scoring a question file),
cli (what eval_vlm.py does).
"""
