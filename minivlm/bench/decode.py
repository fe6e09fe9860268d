"""`python -m minivlm.bench decode`: ms per greedy step against the memory roofline.

A decode step reads every decoder weight once, so its floor is (decoder weight bytes) / (memory
bandwidth), whatever the batch. The copy bandwidth is measured in the same run, in ordinary 4 KB pages
and (CPU, Linux) in 2 MB pages, and the floor takes the faster of the two. Rows: tiny and 26m (tiny
only with --quick), weights in fp32 and bf16, batch 1 and 8, decoded up to three ways:

  eager          generate() as it decodes by default: the model's forward per token, KV cache appended to;
  compiled       generate(..., compiled=True): batch 1 only, one torch.compile graph per step, on the
                 weights packed in 2 MB pages (infer/compiled_decode.py, infer/hugepages.py);
  eager, packed  (CPU) eager again on those packed weights: what the memory layout alone gives.

Each row prints its ratio over the eager row of the same run and batch.
A step's time is the median time between two tokens of one answer (generate's own loop, stamped as
each token comes out), the lower of two tries: both ways are timed alike, and the prefill is left out.
Every row says whether its greedy tokens equal those of eager fp32 at the same batch.
"""

from __future__ import annotations

import statistics

import torch

from . import memory as bench_memory
from .baselines import build_model, synthetic_batch
from .clock import timed_generate
from ..common import DTYPES, print0


def ms_per_step(model, ids, pixel_values, n_new: int, device, compiled: bool) -> tuple[float, torch.Tensor]:
    """-> (median ms per decode step, the greedy tokens (B, n_new)).

    The time between two tokens of one answer is one step (sample + one forward, `timed_generate`); the
    first token, which waits for the prefill, is not counted. The median of the n_new - 1 steps ignores
    the odd step another process slows down."""
    def run():
        stamps, end, tokens = timed_generate(model, ids, pixel_values, n_new, device, compiled)
        return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:] + [end])), tokens

    tokens = run()[1]  # warm-up (and, compiled, the compile)
    best = min(run()[0] for _ in range(2))
    return best * 1e3, tokens


def ways(batches, device) -> list[tuple[int, str]]:
    """(batch, way) in the order they run: eager at every batch first, as generate decodes today, then
    compiled at batch 1, which packs the weights in huge pages; then, on a CPU, eager once more at batch
    1 on those packed weights, which shows what the memory layout alone gives."""
    packed = [(1, "eager, packed")] if device.type == "cpu" else []
    return [(B, "eager") for B in batches] + [(1, "compiled")] + packed


def bench_decode(args, device) -> dict:
    mb = 64 if args.quick else 256
    bw_4k = bench_memory.memory_bandwidth_gbs(device, mb)
    bw_huge = bench_memory.memory_bandwidth_gbs(device, mb, huge_pages=True)
    bw = max(bw_4k, bw_huge or 0.0)  # the floor takes the faster memory: it must be one no step can beat
    threads = torch.get_num_threads() if device.type == "cpu" else None
    n_new = 8 if args.quick else 64
    out = {"bandwidth_gb_s": bw, "bandwidth_4k_pages_gb_s": bw_4k, "bandwidth_huge_pages_gb_s": bw_huge,
           "threads": threads, "rows": []}
    print0(f"decode: greedy, {n_new} new tokens after {args.prompt_text} text tokens + one image; copy bandwidth "
           f"{bw_4k:.1f} GB/s" + (f" (in 2 MB pages {bw_huge:.1f})" if bw_huge else "")
           + (f"; {threads} CPU thread(s)" if threads else ""))
    for preset in (["tiny"] if args.quick else ["tiny", "26m"]):
        model = build_model(preset, device).eval()
        fp32_tokens, eager_ms = {}, {}
        for dtype in ("fp32", "bf16"):
            model.to(DTYPES[dtype])  # new tensors in ordinary memory: the packing of the last dtype is undone
            best_ms = bench_memory.decoder_weight_bytes(model) / (bw * 1e9) * 1e3
            for B, way in ways(args.gen_batches, device):
                ids, _, pixel_values = synthetic_batch(model, B, model.run_length + args.prompt_text, device)
                step_ms, tokens = ms_per_step(model, ids, pixel_values.to(DTYPES[dtype]), n_new, device,
                                              way == "compiled")
                fp32_tokens.setdefault(B, tokens)
                eager_ms.setdefault((dtype, B), step_ms)
                row = {"preset": preset, "dtype": dtype, "batch": B, "way": way, "ms_per_step": step_ms,
                       "tokens_per_s": B / step_ms * 1e3, "roofline_ms": best_ms,
                       "pct_of_roofline": 100 * best_ms / step_ms,
                       "speedup_over_eager": eager_ms[(dtype, B)] / step_ms,
                       "same_tokens_as_fp32": bool(torch.equal(tokens, fp32_tokens[B]))}
                out["rows"].append(row)
                print0(f"  {preset:<5} {dtype} batch {B:<2} {way:<13} {step_ms:7.2f} ms/step "
                       f"({row['tokens_per_s']:7.1f} tok/s), roofline {best_ms:5.2f} ms -> "
                       f"{row['pct_of_roofline']:3.0f}%, {row['speedup_over_eager']:.2f}x eager; "
                       f"greedy tokens as eager fp32: {'yes' if row['same_tokens_as_fp32'] else 'no'}")
        del model
    return out
