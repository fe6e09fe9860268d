"""What `--compile` buys: one training step with the decoder compiled vs eager, on the same weights.

    python -m minivlm.bench.compile_speed [--preset tiny|26m] [--batch 4] [--seq-len 256] [--steps 6] [--device cpu]

`MiniMindVLM.compile_decoder()` compiles everything after the splice as one graph (the splice's
data-dependent checks stay eager, see vlm.py). Compilation itself takes a while on the first steps, so
both models run `--warmup` untimed steps, then `--steps` timed ones, interleaved (eager, compiled, eager,
…) so that a change in machine load hits both alike. On CPU the time is process CPU time, which other
processes on a shared machine do not inflate; on GPU it is wall time after a synchronize.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from .baselines import build_model, synthetic_batch
from ..common import print0, resolve_device, sync
from ..train.optim import make_optimizer
from ..train.optim import set_trainable


def timed_step(model, optimizer, batch, device) -> float:
    ids, labels, pixel_values = batch
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    sync(device)
    t0 = clock()
    loss = model(ids, pixel_values, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return clock() - t0


def run(preset: str, batch: int, seq_len: int, steps: int, warmup: int, device) -> dict:
    eager = build_model(preset, device)
    set_trainable(eager, "sft", 0, False)
    compiled = copy.deepcopy(eager).compile_decoder()  # same starting weights, its own optimizer state
    eager.train(), compiled.train()
    data = synthetic_batch(eager, batch, seq_len, device)
    opts = {name: make_optimizer(m, lr=1e-5) for name, m in (("eager", eager), ("compiled", compiled))}
    models = {"eager": eager, "compiled": compiled}
    t0 = time.time()
    for _ in range(warmup):
        for name, m in models.items():
            timed_step(m, opts[name], data, device)
    times = {name: [] for name in models}
    for _ in range(steps):
        for name, m in models.items():
            times[name].append(timed_step(m, opts[name], data, device))
    out = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    out["speedup"] = out["eager"] / out["compiled"]
    out["warmup_s"] = time.time() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minivlm.bench.compile_speed", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="model size (tiny, 26m, 104m, 26m-moe)")
    ap.add_argument("--batch", type=int, default=4, help="samples per step")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sample, image run included")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model (compilation happens here)")
    ap.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    r = run(args.preset, args.batch, args.seq_len, args.steps, args.warmup, device)
    print0(f"compile: preset {args.preset}, batch {args.batch} x {args.seq_len}, {device}: eager "
           f"{r['eager']:.1f} ms/step, compiled decoder {r['compiled']:.1f} ms/step, speed-up {r['speedup']:.2f}x "
           f"(warm-up incl. compilation {r['warmup_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
