"""`python -m minivlm.bench gpu`: the numbers to bring back from a borrowed GPU, in one run of minutes.

    python -m minivlm.bench gpu [--out gpu.md] [--json gpu.json] [--peak-tflops T] [--dry-run --device cpu]

For the real 26m preset + CLIP ViT-B/16 (random weights: speed does not depend on their values, so
nothing is downloaded) it measures, on synthetic inputs of the real shapes (baselines.synthetic_batch):

  training   samples/s of one optimizer step (AdamW, grad clip 1.0, as train.py) in bf16 autocast, for
             the pretrain policy (projector trained, decoder and tower frozen: MiniMind-V's pretrain)
             and the SFT policy (projector + decoder), at batch 16 and 32, each eager and with the
             decoder compiled (MiniMindVLM.compile_decoder, what training's --compile does). Tokens
             per sample = the stage's max_length (640 / 1536): the longest batch a stage sees. MFU
             from flops.train_step_flops against the card's peak (flops.PEAK_TFLOPS, or --peak-tflops).
  decoding   greedy tokens/s with the KV cache (infer.generate), batch 1 and 8, after a prompt of one
             image + text (196 + 32 tokens, as `bench generate`), the weights in bf16; batch 1 also with
             generate(..., compiled=True) (always, dry runs too: a failure becomes the row's note).

Every row: warm-up steps (for compiled rows they include the compilation), then timed steps with a
synchronize around each (clock.time_it); the median counts. Peak memory is torch.cuda's high-water
mark since the row began (on CPU the process's peak RSS, which never goes down). The result is a
markdown table on stdout (and --out), the raw numbers in --json, a progress line with ETA per row.

--dry-run is the same code path on the tiny preset, short sequences, 2 timed steps and a few decoded
tokens, fp32: seconds on a CPU, which is what the tests run. torch.compile takes a minute per row
there on a small CPU, so a CPU dry run lists the compiled rows as skipped unless --compile-on-cpu;
`--compile-backend aot_eager` then traces the same graphs without generating C++ (the tests' choice).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from .baselines import build_model, synthetic_batch
from .clock import cpu_threads, optimizer_step, time_it, timed_generate
from .decode import ms_per_step
from .flops import card_peak_tflops, mfu, train_step_flops
from ..common import (DTYPES, Progress, UserError, atomic_write, fmt_time, grad_scaler, peak_memory_mb,
                      positive_int, print0, reset_peak_memory, resolve_device, resolve_dtype, write_error)
from ..model.config import vlm_preset
from ..train.optim import make_optimizer, set_trainable

POLICIES = ("pretrain", "sft")
MODES = ("eager", "compiled")
SKIP_NOTE = "skipped on CPU dry run (use --compile-on-cpu to include)"
TRAIN_COLUMNS = ["policy", "batch", "tokens/sample", "mode", "samples/s", "tokens/s", "ms/step", "TFLOP/s", "MFU",
                 "peak MB", "note"]
DECODE_COLUMNS = ["batch", "prompt tokens", "new tokens", "tokens/s", "ms/token", "prefill ms", "peak MB", "note"]


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minivlm.bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")
    a("--dry-run", action="store_true",
      help="tiny preset, short sequences, 1 warm-up + 2 timed steps per row, 6 decoded tokens, fp32: "
           "the same code path in seconds on a CPU (what CI runs)")
    a("--preset", default=None, choices=["26m", "104m", "26m-moe", "tiny"],
      help="model size, always with its vision tower (default 26m + ViT-B/16; tiny with --dry-run)")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
      help="training: autocast dtype; decoding: the weights' dtype (default auto: bf16 on a GPU that has it, "
           "else fp32)")
    a("--batches", type=positive_int, nargs="+", default=[16, 32], help="training batch sizes (default 16 32)")
    a("--decode-batches", type=positive_int, nargs="+", default=[1, 8], help="decoding batch sizes (default 1 8)")
    a("--pretrain-seq-len", type=positive_int, default=None,
      help="tokens per pretrain sample, image run included (default 640, the pretrain max_length)")
    a("--sft-seq-len", type=positive_int, default=None,
      help="tokens per SFT sample, image run included (default 1536, the SFT max_length)")
    a("--prompt-tokens", type=positive_int, default=None,
      help="decoding prompt length, image run included (default image run + 32 = 228; +8 with --dry-run)")
    a("--new-tokens", type=positive_int, default=None, help="tokens decoded per row (default 256; 6 with --dry-run)")
    a("--steps", type=positive_int, default=None, help="timed steps per training row (default 10; 2 with --dry-run)")
    a("--warmup", type=int, default=None,
      help="untimed steps first, compilation included (default 3; 1 with --dry-run)")
    a("--peak-tflops", type=float, default=None,
      help="peak dense TFLOP/s for MFU (default: the card's from a table of H100/H200/A100 by its name; "
           "unknown card or CPU: MFU n/a)")
    a("--compile-on-cpu", action="store_true",
      help="with --dry-run on a CPU, also run the compiled rows (about a minute each with inductor)")
    a("--compile-backend", default="inductor",
      help="torch.compile backend of the compiled rows (default inductor; aot_eager traces without codegen)")
    a("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's; 1 with --dry-run)")
    a("--out", default=None, metavar="FILE.md", help="also write the markdown table to this file")
    a("--json", default=None, metavar="FILE", help="also write every number (and the run's setup) to this JSON file")
    return p


def resolve(args) -> argparse.Namespace:
    """Fill the unset flags: --dry-run picks tiny sizes, otherwise the real ones."""
    device = resolve_device(args.device)  # on CUDA also switches TF32 on, as training does
    args.device = str(device)
    dry = args.dry_run
    args.dtype = resolve_dtype(args.dtype, device)  # auto: bf16 on a GPU that has it, so fp32 on a CPU
    defaults = dict(preset="tiny" if dry else "26m", steps=2 if dry else 10, warmup=1 if dry else 3,
                    new_tokens=6 if dry else 256, threads=1 if dry else None)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    run_length = build_sizes(args.preset)
    # The dry run keeps the row structure (batch 16 and 32) but shortens the text: tiny steps stay fast.
    for k, real, dry_len in (("pretrain_seq_len", 640, 16), ("sft_seq_len", 1536, 48), ("prompt_tokens", None, 8)):
        if getattr(args, k) is None:
            setattr(args, k, run_length + dry_len if dry else (real or run_length + 32))
    args.new_tokens = max(args.new_tokens, 2)  # token 0 comes from the prefill: decoding needs one more
    args.skip_compiled = dry and device.type == "cpu" and not args.compile_on_cpu
    if args.peak_tflops is not None:
        args.peak_source = "--peak-tflops"
    else:
        args.peak_tflops = card_peak_tflops(device_name(device), args.dtype) if device.type == "cuda" else None
        args.peak_source = "table (flops.PEAK_TFLOPS)" if args.peak_tflops else None
    return args


def build_sizes(preset: str) -> int:
    """The preset's image run length (placeholder tokens per image), without building a model."""
    return vlm_preset(preset).run_length


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def main(argv=None) -> int:
    try:
        args = resolve(build_parser().parse_args(argv))
    except UserError as e:
        print0(f"error: {e}")
        return 2
    with cpu_threads(args.threads):
        results = run(args, argv)
    text = markdown(results)
    print0(text)
    try:
        for path, data in ((args.out, text), (args.json, json.dumps(results, indent=2))):
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                atomic_write(path, data.encode("utf-8"))
                print0(f"wrote {path}")
    except OSError as e:
        print0(f"error: {write_error(e)}")
        return 2
    return 0


# ---------------------------------------------------------------------------------------------
# The run


def run(args, argv) -> dict:
    device = torch.device(args.device)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": device_name(device), "preset": args.preset, "dtype": args.dtype,
            "dry_run": args.dry_run, "peak_tflops": args.peak_tflops, "peak_source": args.peak_source,
            "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
            "compile_backend": args.compile_backend, "argv": list(sys.argv[1:] if argv is None else argv)}
    print0(f"bench gpu: {meta['device_name']} ({device}), torch {torch.__version__}, preset {args.preset}, "
           f"{args.dtype}, peak " + (f"{args.peak_tflops} TFLOP/s" if args.peak_tflops else "unknown (MFU n/a)"))
    rows = len(POLICIES) * len(MODES) * len(args.batches) + len(args.decode_batches) + (1 in args.decode_batches)
    progress = RowProgress(rows)
    t0 = time.perf_counter()
    train = [r for policy in POLICIES for r in bench_policy(policy, args, device, progress)]
    decode = bench_decode(args, device, progress)
    meta["elapsed_s"] = time.perf_counter() - t0
    return {"meta": meta, "train": train, "decode": decode}


class RowProgress:
    """One progress line per finished row: what it measured, the time so far, and the time left at
    the rate so far (compiled rows take longer than eager ones, so the ETA is rough early on)."""

    def __init__(self, rows: int):
        self.clock, self.done = Progress(rows, "bench gpu", "rows"), 0

    def __call__(self, label: str, summary: str):
        self.done += 1
        c = self.clock
        print0(f"[{self.done}/{c.total}] {label}: {summary}  (elapsed {fmt_time(c.elapsed())}, "
               f"ETA {fmt_time(c.eta(self.done))})")


def bench_policy(policy: str, args, device, progress) -> list[dict]:
    """The training rows of one policy: eager at every batch size, then compiled at every batch size
    (one model: compile_decoder wraps the same parameters, so both modes train the same weights)."""
    model = build_model(args.preset, device)
    set_trainable(model, policy, 0, False)  # as train.py: pretrain -> projector only; sft -> + decoder
    model.train()
    seq_len = args.pretrain_seq_len if policy == "pretrain" else args.sft_seq_len
    rows = []
    for mode in MODES:
        if mode == "compiled" and not args.skip_compiled:
            # Compiled graphs of earlier rows (another policy's model) would only count against
            # dynamo's recompile limit; a fresh start compiles exactly what this policy needs.
            torch._dynamo.reset()
            # The second batch size recompiles with a dynamic batch dimension (dynamo's automatic
            # dynamic shapes), the kernels training gets too, whose batches vary in length.
            model.compile_decoder(backend=args.compile_backend)
        for batch in args.batches:
            row = {"policy": policy, "batch": batch, "tokens_per_sample": seq_len, "mode": mode}
            if mode == "compiled" and args.skip_compiled:
                row.update(note=SKIP_NOTE)
            else:
                row.update(train_row(model, policy, batch, seq_len, mode == "compiled", args, device))
            rows.append(row)
            progress(f"{policy} batch {batch} {mode}", row["note"] or
                   f"{row['samples_per_s']:.1f} samples/s, {row['ms_per_step']:.1f} ms/step, "
                   f"peak {row['peak_mem_mb']:.0f} MB" + (f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] else ""))
    del model
    empty_cache(device)
    return rows


def train_row(model, policy: str, batch: int, seq_len: int, compiled: bool, args, device) -> dict:
    """Time one optimizer step of `model` at this batch size; samples/s, FLOP rate, MFU, peak memory."""
    ids, labels, pixel_values = synthetic_batch(model, batch, seq_len, device)
    # A fresh optimizer per row: its state (2 fp32 moments per trained weight) is part of the row's memory.
    optimizer = make_optimizer(model, lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
    scaler = grad_scaler(device, args.dtype)

    def step():
        optimizer_step(model, ids, pixel_values, labels, optimizer, scaler, device, args.dtype)

    empty_cache(device)
    reset_peak_memory(device)
    # A compiled row compiles on its first step: at least that one stays off the clock.
    warmup = max(args.warmup, 1) if compiled else args.warmup
    seconds = statistics.median(time_it(step, args.steps, warmup, device))
    peak = peak_memory_mb(device)
    del optimizer
    flops = train_step_flops(model.vlm_config, batch, seq_len, decoder_frozen=policy == "pretrain")["total"]
    tflops, frac = mfu(flops, seconds, args.peak_tflops)
    return {"samples_per_s": batch / seconds, "tokens_per_s": batch * seq_len / seconds, "ms_per_step": seconds * 1e3,
            "tflops": tflops, "mfu": frac, "peak_mem_mb": peak, "flops_per_step": flops, "note": ""}


def bench_decode(args, device, progress) -> list[dict]:
    """Greedy decoding with the KV cache, weights in the run's dtype (no autocast: half the memory)."""
    model = build_model(args.preset, device)
    if args.dtype != "fp32":
        model.to(DTYPES[args.dtype])
    model.eval()
    rows = []
    for batch in args.decode_batches:
        ids, _, pixel_values = synthetic_batch(model, batch, args.prompt_tokens, device)
        pixel_values = pixel_values.to(DTYPES[args.dtype])
        timed_generate(model, ids, pixel_values, 2, device)  # warm-up: first calls allocate, pick kernels
        empty_cache(device)
        reset_peak_memory(device)
        stamps, end, _ = timed_generate(model, ids, pixel_values, args.new_tokens, device)
        # stamps[0] starts the prefill, which yields token 0; token k >= 1 costs stamps[k+1] - stamps[k]
        # (the last one ends at `end`). The median: a shared machine adds random stalls.
        step_s = float(np.median(np.diff(stamps + [end])[1:]))
        row = {"batch": batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "tokens_per_s": batch / step_s, "ms_per_token": step_s * 1e3,
               "prefill_ms": (stamps[1] - stamps[0]) * 1e3, "peak_mem_mb": peak_memory_mb(device), "note": ""}
        rows.append(row)
        progress(f"decode batch {batch}", f"{row['tokens_per_s']:.1f} tokens/s, "
               f"{row['ms_per_token']:.2f} ms/token, peak {row['peak_mem_mb']:.0f} MB")
        if batch == 1:
            rows.append(compiled_decode_row(model, ids, pixel_values, row, args, device))
            progress("decode batch 1, compiled=True", rows[-1]["note"])
    del model
    empty_cache(device)
    return rows


def compiled_decode_row(model, ids, pixel_values, eager: dict, args, device) -> dict:
    """Batch 1 through generate(..., compiled=True), timed as `bench decode` times it. Never run on CUDA
    before this script's first GPU run: a failure becomes the row's note instead of ending the run."""
    row = {**eager, "tokens_per_s": None, "ms_per_token": None, "peak_mem_mb": None}
    try:
        reset_peak_memory(device)
        ms, _ = ms_per_step(model, ids, pixel_values, args.new_tokens, device, compiled=True)
        row.update(tokens_per_s=1e3 / ms, ms_per_token=ms, peak_mem_mb=peak_memory_mb(device),
                   note=f"compiled=True: {eager['ms_per_token'] / ms:.2f}x eager")
    except Exception as e:  # noqa: BLE001 - whatever it was, the table must still be written
        row["note"] = f"compiled=True failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return row


def empty_cache(device):
    """Hand cached GPU blocks back between rows, so a row's peak is not shaped by the previous row's."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The table


def fmt(x) -> str:
    """A number for the table: 3 significant digits, whole numbers from 100 up; None -> n/a."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, int):
        return str(x)
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict) -> str:
    m = results["meta"]
    peak = f"{m['peak_tflops']} TFLOP/s ({m['peak_source']})" if m["peak_tflops"] else "unknown: MFU n/a"
    mem = "torch.cuda.max_memory_allocated" if m["device"].startswith("cuda") else "process peak RSS (high-water mark)"
    lines = [f"## minivlm bench gpu: {m['device_name']} ({m['device']})", "",
             f"torch {m['torch']}, preset {m['preset']} + its vision tower, random weights, {m['dtype']}"
             f"{' (dry run)' if m['dry_run'] else ''}; {m['warmup']} warm-up + {m['steps']} timed steps per "
             f"training row (median); peak {peak}; peak MB = {mem}; {m['elapsed_s']:.0f} s in all.", "",
             "### Training step (AdamW + grad clip; pretrain: projector trained, sft: projector + decoder)", ""]
    train = [[r["policy"], str(r["batch"]), str(r["tokens_per_sample"]), r["mode"]]
             + (["—"] * 6 if r["note"] == SKIP_NOTE else
                [fmt(r[k]) for k in ("samples_per_s", "tokens_per_s", "ms_per_step", "tflops")]
                + [fmt(None if r["mfu"] is None else 100 * r["mfu"]) + ("%" if r["mfu"] is not None else ""),
                   fmt(r["peak_mem_mb"])])
             + [r["note"]] for r in results["train"]]
    lines += table(TRAIN_COLUMNS, train)
    lines += ["", "### Decoding (greedy, KV cache, one image in the prompt)", ""]
    decode = [[str(r["batch"]), str(r["prompt_tokens"]), str(r["new_tokens"])]
              + [fmt(r[k]) for k in ("tokens_per_s", "ms_per_token", "prefill_ms", "peak_mem_mb")] + [r["note"]]
              for r in results["decode"]]
    lines += table(DECODE_COLUMNS, decode)
    return "\n".join(lines) + "\n"
