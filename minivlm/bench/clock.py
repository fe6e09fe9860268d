"""The benchmark's clocks, shared by the suite's sections and `bench gpu`: a timed loop with warm-up,
one optimizer step as the training loop takes it, and greedy generation with a time stamp per token.
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..common import autocast, sync
from ..infer.generate import SamplingConfig, _decode_steps, _eval_mode


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


def timed_generate(model, ids, pixel_values, n_new: int, device, compiled: bool = False
                   ) -> tuple[list[float], float, torch.Tensor]:
    """Greedy-generate n_new tokens (generate's own loop; compiled: as in `generate`) and stamp the clock
    as each token comes out. -> (stamps, end, tokens (B, n_new)).

    stamps[0] is the start; the prefill yields token 0, and stamps[k] (k >= 1) is the moment token k - 1
    came out, so token k >= 1 costs stamps[k + 1] - stamps[k] (a sample and one forward; the last one
    ends at `end`). One run yields the cost of every single token, whichever way the steps are computed.
    """
    cfg = SamplingConfig(max_new_tokens=n_new)
    sync(device)
    stamps, tokens = [time.perf_counter()], []
    with torch.no_grad(), _eval_mode(model):
        for tok in _decode_steps(model, ids, pixel_values, None, None, cfg, None, 0, compiled):
            sync(device)  # the token's work is done: the clock measures work, not its launch
            stamps.append(time.perf_counter())
            tokens.append(tok)
    return stamps[:-1], stamps[-1], torch.stack(tokens, 1)


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
