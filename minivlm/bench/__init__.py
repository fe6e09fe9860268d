"""Benchmarks (`python -m minivlm.bench`): suite (the command), gpu (`bench gpu`, the GPU run ready to
go), epoch, memory, compile_speed, flops (FLOPs, MFU, KV-cache bytes, cards' peak rates), clock (timed
loops), baselines (MiniMind-V-style variants to compare against).
"""
