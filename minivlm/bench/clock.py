"""The benchmark's clocks, shared by the suite's sections and `bench gpu`: a timed loop with warm-up,
one optimizer step as the training loop takes it, and greedy generation with a time stamp per token.
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..common import autocast, sync
from ..infer.generate import SamplingConfig, generate


def time_it(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Run fn warmup + steps times; return the wall-clock seconds of the timed runs.

    The untimed runs go first because the first calls allocate memory, fill caches and, on GPU, pick
    kernels. GPU kernels run asynchronously: without a sync the clock would stop at their launch."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def timed_generate(model, ids, pixel_values, n_new: int, device) -> tuple[list[float], float]:
    """Greedy-generate n_new tokens; return the start time of every forward call and the end time.

    `generate` calls the model once for the prefill and once per further token; a forward pre-hook
    stamps the clock at each call, so one run yields the cost of every single token.
    """
    stamps = []

    def stamp(module, inputs):
        sync(device)  # the previous token's work is done: the clock measures work, not its launch
        stamps.append(time.perf_counter())

    hook = model.register_forward_pre_hook(stamp)
    try:
        generate(model, ids, pixel_values, cfg=SamplingConfig(max_new_tokens=n_new), eos_id=None)
        sync(device)
    finally:
        hook.remove()
    return stamps, time.perf_counter()


def optimizer_step(model, ids, pixel_values, labels, optimizer, scaler, device, dtype):
    """One training step as train/loop.py takes it: autocast forward, scaled backward, clip at 1.0 (the
    default --grad-clip), step, zero the gradients."""
    with autocast(device, dtype):
        loss = model(ids, pixel_values, labels=labels, return_logits=False).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """torch's CPU threads set to n inside (None: left as they are), restored after: a benchmark's main()
    may run inside another process (the tests), which should get its own setting back."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
