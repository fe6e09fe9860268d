"""Benchmarks (`python -m minivlm.bench`): suite (the command), epoch, memory, compile_speed,
flops (FLOPs, MFU, KV-cache bytes), baselines (MiniMind-V-style variants to compare against).
"""
