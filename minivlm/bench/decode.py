"""`python -m minivlm.bench decode`: ms per greedy step against the memory roofline.

A decode step reads every decoder weight once, so its floor is (decoder weight bytes) / (memory
bandwidth), whatever the batch; the copy bandwidth is measured in the same run. Rows: tiny and 26m
(tiny only with --quick), weights in fp32 and bf16, batch 1 and 8, each decoded two ways:

  eager      generate() as it decodes by default: the model's forward per token, KV cache appended to;
  compiled   generate(..., compiled=True): batch 1 only, one torch.compile graph per step
             (infer/compiled_decode.py); its ratio over the eager row of the same run is printed.

A step's time is the median time between two tokens of one answer (generate's own loop, stamped as
each token comes out), the lower of two tries: both ways are timed alike, and the prefill is left out.
Every row says whether its greedy tokens equal those of eager fp32 at the same batch.
"""

from __future__ import annotations

import statistics
import time

import torch

from . import memory as bench_memory
from .baselines import build_model, synthetic_batch
from ..common import DTYPES, print0, sync
from ..infer.generate import SamplingConfig, _decode_steps


def ms_per_step(model, ids, pixel_values, n_new: int, device, compiled: bool) -> tuple[float, torch.Tensor]:
    """-> (median ms per decode step, the greedy tokens (B, n_new)).

    The clock is stamped as each token comes out of generate's loop; the time between two tokens is
    one step (sample + one forward), and the first token, which waits for the prefill, is not counted.
    The median of the n_new - 1 steps ignores the odd step another process slows down."""
    cfg = SamplingConfig(max_new_tokens=n_new)

    def run():
        stamps, tokens = [], []
        for tok in _decode_steps(model, ids, pixel_values, None, None, cfg, None, 0, compiled):
            sync(device)
            stamps.append(time.perf_counter())
            tokens.append(tok)
        return statistics.median(b - a for a, b in zip(stamps, stamps[1:])), torch.stack(tokens, 1)

    with torch.no_grad():
        tokens = run()[1]  # warm-up (and, compiled, the compile)
        best = min(run()[0] for _ in range(2))
    return best * 1e3, tokens


def bench_decode(args, device) -> dict:
    bw = bench_memory.memory_bandwidth_gbs(device, 64 if args.quick else 256)
    n_new, out = (8 if args.quick else 64), {"bandwidth_gb_s": bw, "rows": []}
    print0(f"decode: greedy, {n_new} new tokens after {args.prompt_text} text tokens + one image; "
           f"copy bandwidth {bw:.1f} GB/s")
    for preset in (["tiny"] if args.quick else ["tiny", "26m"]):
        model = build_model(preset, device).eval()
        fp32_tokens, eager_ms = {}, {}
        for dtype in ("fp32", "bf16"):
            model.to(DTYPES[dtype])
            best_ms = bench_memory.decoder_weight_bytes(model) / (bw * 1e9) * 1e3
            for B in args.gen_batches:
                ids, _, pixel_values = synthetic_batch(model, B, model.run_length + args.prompt_text, device)
                pixel_values = pixel_values.to(DTYPES[dtype])
                for way in (["eager", "compiled"] if B == 1 else ["eager"]):
                    step_ms, tokens = ms_per_step(model, ids, pixel_values, n_new, device, way == "compiled")
                    fp32_tokens.setdefault(B, tokens)
                    eager_ms.setdefault((dtype, B), step_ms)
                    row = {"preset": preset, "dtype": dtype, "batch": B, "way": way, "ms_per_step": step_ms,
                           "tokens_per_s": B / step_ms * 1e3, "roofline_ms": best_ms,
                           "pct_of_roofline": 100 * best_ms / step_ms,
                           "speedup_over_eager": eager_ms[(dtype, B)] / step_ms,
                           "same_tokens_as_fp32": bool(torch.equal(tokens, fp32_tokens[B]))}
                    out["rows"].append(row)
                    print0(f"  {preset:<5} {dtype} batch {B:<2} {way:<8} {step_ms:7.2f} ms/step "
                           f"({row['tokens_per_s']:7.1f} tok/s), roofline {best_ms:5.2f} ms -> "
                           f"{row['pct_of_roofline']:3.0f}%, {row['speedup_over_eager']:.2f}x eager; "
                           f"greedy tokens as eager fp32: {'yes' if row['same_tokens_as_fp32'] else 'no'}")
        del model
    return out
