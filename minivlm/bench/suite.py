"""Benchmarks: how fast does minivlm train, generate and load data, and why.

    python -m minivlm.bench {train,generate,decode,data,epoch,all} [--preset 26m] [--device cpu|cuda]
                            [--dtype fp32|bf16|fp16] [--batch 4] [--seq-len 640] [--steps N] [--warmup N]
                            [--json OUT] [--quick]
    python -m minivlm.bench gpu [--out FILE.md] [--json FILE] [--peak-tflops T] [--dry-run] ...  (its own flags: gpu.py)

Everything runs on random weights and synthetic inputs of the real shapes (the preset's decoder and
CLIP tower, one run of 196 placeholder ids + random text ids, pixel_values (B, 1, 3, 224, 224)): speed
does not depend on what the weights are, so nothing is downloaded. The sections (docs/benchmarks.md
says what each number means):
  train     one SFT optimizer step (vision frozen, projector + decoder trained), also with eager attention
            and as the "baseline" (eager attention + MiniMind-V's loop splice + fp32 tower: baselines.py);
            the splice op and the vision tower forward alone. TFLOP/s and MFU from the counts of flops.py.
  generate  greedy decoding from a 196 + 32 token prompt, batch 1 and 8: prefill time, decode tokens/s,
            ms/token as the KV cache grows; inference memory.
  decode    ms per decode step against the memory roofline, tiny and 26m, fp32 and bf16 weights, batch 1
            and 8, eager and (batch 1) compiled, with a check that the greedy tokens equal fp32's (decode.py).
  data      JPEGs + a MiniMind-V jsonl -> VLMDataset -> DataLoader(collate_vlm): samples/s.
  epoch     a whole epoch, data to step, minivlm vs a MiniMind-V-style pipeline (bench_epoch.py; not in `all`).
  gpu       the GPU run ready to go (gpu.py; not in `all`): 26m + ViT-B/16 training samples/s and MFU,
            pretrain and SFT policies, batch 16 and 32, eager and compiled, bf16; decode tokens/s at
            batch 1 and 8; peak memory per row; a markdown table. --dry-run: the same on CPU in seconds.

Times are medians of `--steps` timed runs after `--warmup` untimed ones (time_it says why).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import epoch as bench_epoch
from .decode import bench_decode
from . import gpu as bench_gpu
from .clock import cpu_threads, optimizer_step, time_it, timed_generate as _timed_generate
from . import memory as bench_memory
from .baselines import (GivenFeaturesLoopVLM, GivenFeaturesVLM, build_model, read_bytes, rebuild_as, synthetic_batch,
                        variant, write_jsonl_dataset)
from ..common import (DTYPES, atomic_write, autocast, grad_scaler, peak_memory_mb, print0, reset_peak_memory,
                      resolve_device)
from ..model.config import vlm_preset
from ..data.dataset import VLMDataset, collate_vlm
from .flops import (H100_PEAK_TFLOPS, kv_cache_bytes, lm_matmul_params, mfu, projector_matmul_params,
                    train_step_flops)
from ..infer.generate import SamplingConfig, generate
from ..train.optim import make_optimizer
from ..data.parquet import ParquetVLMDataset, write_parquet
from ..data.tokenizer import Tokenizer
from ..data.tool import train_tokenizer
from ..train.optim import set_trainable
from ..model.vlm import MiniMindVLM


# ---------------------------------------------------------------------------------------------
# Sections


def bench_train(args, device) -> dict:
    model = build_model(args.preset, device)
    # SFT trainability: vision frozen, projector + the whole decoder (embeddings included) trained.
    # MiniMind-V's real pretrain stage trains the projector only (train_lm_layers=0); its step is a bit
    # cheaper (no decoder weight gradients) but still backpropagates through all decoder layers.
    set_trainable(model, "sft", 0, False)
    model.train()
    ids, labels, pixel_values = synthetic_batch(model, args.batch, args.seq_len, device)
    B, T = ids.shape
    cfg = model.vlm_config
    flops = train_step_flops(cfg, B, T)
    out = {"preset": args.preset, "batch": B, "seq_len": T, "dtype": args.dtype, "steps": args.steps,
           "warmup": args.warmup, "trainable": "sft policy: set_trainable(model, 'sft', 0, False)",
           "params": {"lm_matmul": lm_matmul_params(cfg.lm), "projector_matmul": projector_matmul_params(cfg),
                      "vision_total": sum(p.numel() for p in model.vision_encoder.parameters()),
                      "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)},
           "flops_per_step": flops}
    print0(f"train: preset {args.preset}, batch {B} x {T} tokens, dtype {args.dtype}, "
           f"{flops['total'] / 1e9:.1f} GFLOP/step (decoder {flops['decoder'] / 1e9:.1f}, "
           f"vision {flops['vision'] / 1e9:.1f}, projector {flops['projector'] / 1e9:.2f})")
    # The variants share the model's parameters (baselines.variant), so they differ in the forward only.
    models = {"minivlm": model, "eager_attention": variant(model, attn="eager"),
              "baseline": variant(model, attn="eager", splice="loop", vision_fp32=True)}
    times, peaks = _time_train_steps(models, ids, labels, pixel_values, args, device)
    for name in models:
        s = statistics.median(times[name])
        tflops, frac = mfu(flops["total"], s, args.peak_tflops)
        r = out[name] = {"ms_per_step": s * 1e3, "samples_per_s": B / s, "tokens_per_s": B * T / s,
                         "peak_mem_mb": peaks[name], "tflops": tflops, "mfu": frac,
                         "all_ms": [t * 1e3 for t in times[name]]}
        print0(f"  {name:<16} {r['ms_per_step']:9.1f} ms/step {r['samples_per_s']:8.2f} samples/s "
               f"{r['tokens_per_s']:9.0f} tok/s {r['tflops'] * 1e3:8.1f} GFLOP/s"
               + (f" MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "") + f" peak {r['peak_mem_mb']:.0f} MB")
    out["splice"] = bench_splice(model, ids, pixel_values, args, device)
    out["vision"] = bench_vision(model, pixel_values, args, device)
    base = out["minivlm"]["ms_per_step"]
    out["ratios"] = {
        "sdpa_vs_eager": out["eager_attention"]["ms_per_step"] / base,
        "vectorised_vs_loop_splice": out["splice"]["loop_ms"] / out["splice"]["vectorised_ms"],
        "vision_bf16_vs_fp32": out["vision"]["fp32_ms"] / out["vision"]["bf16_ms"],
        "minivlm_vs_baseline": out["baseline"]["ms_per_step"] / base,
    }
    return out


def _time_train_steps(models: dict, ids, labels, pixel_values, args, device) -> tuple[dict, dict]:
    """Time one training step of each model (models sharing one set of parameters); return the timed
    seconds and the peak memory (MB) of each."""
    # train.py's optimizer (AdamW, decay groups; fused on GPU), one for all: the models share the
    # parameters it steps. A tiny lr: the weights barely move, so every model does the same work on
    # (nearly) the same numbers.
    optimizer = make_optimizer(models["minivlm"], lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
    scaler = grad_scaler(device, args.dtype)

    def step(model):
        optimizer_step(model, ids, pixel_values, labels, optimizer, scaler, device, args.dtype)

    times = {name: [] for name in models}
    peaks = {name: 0.0 for name in models}
    # Interleaved (A B C A B C ...) rather than all steps of A, then all of B: when the load of a
    # shared machine changes, it then slows every variant alike instead of the one that ran at the time.
    for rep in range(args.warmup + args.steps):
        for name, model in models.items():
            reset_peak_memory(device)
            [seconds] = time_it(functools.partial(step, model), steps=1, warmup=0, device=device)
            peaks[name] = max(peaks[name], peak_memory_mb(device))
            if rep >= args.warmup:
                times[name].append(seconds)
    return times, peaks


def bench_splice(model, ids, pixel_values, args, device) -> dict:
    """The splice alone, loop vs vectorised, forward + backward, with the image features precomputed
    (so the vision tower, which both versions run alike, does not drown the difference)."""
    embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
    with torch.no_grad():
        feats = model.encode_images(pixel_values[:, 0])  # (B, L, h)
        loop_out = variant(model, splice="loop").splice_images(ids, embeds, pixel_values)
        vec_out = model.splice_images(ids, embeds, pixel_values)
    match = torch.allclose(loop_out, vec_out)  # tests/test_bench.py checks this exactly on small inputs

    def timed(cls):
        spliced = rebuild_as(model, cls)
        spliced.features = feats  # both versions get the same ready features

        def run():
            spliced.splice_images(ids, embeds, pixel_values).sum().backward()

        return statistics.median(time_it(run, max(5, args.steps * 3), max(1, args.warmup), device))

    vec, loop = timed(GivenFeaturesVLM), timed(GivenFeaturesLoopVLM)
    print0(f"  splice (fwd+bwd)  vectorised {vec * 1e3:.3f} ms, loop {loop * 1e3:.3f} ms -> "
           f"{loop / vec:.2f}x; outputs match: {match}")
    return {"vectorised_ms": vec * 1e3, "loop_ms": loop * 1e3, "match": bool(match)}


def bench_vision(model, pixel_values, args, device) -> dict:
    """The frozen vision tower's forward: fp32 vs bf16 autocast. On GPU on the batch's images; on CPU
    on one image, because bf16 without CPU support for it is emulated and takes many seconds per image."""
    images = pixel_values[:, 0] if device.type == "cuda" else pixel_values[:1, 0]
    tower = model.vision_encoder

    def run(dtype):
        with torch.no_grad(), autocast(device, dtype):
            tower.select_features(images)

    fp32 = statistics.median(time_it(lambda: run("fp32"), args.steps, args.warmup, device))
    bf16 = statistics.median(time_it(lambda: run("bf16"), args.steps, args.warmup, device))
    print0(f"  vision tower fwd  {images.shape[0]} images: fp32 {fp32 * 1e3:.1f} ms, bf16 autocast "
           f"{bf16 * 1e3:.1f} ms -> bf16 is {fp32 / bf16:.2f}x as fast")
    return {"images": images.shape[0], "fp32_ms": fp32 * 1e3, "bf16_ms": bf16 * 1e3}


def bench_generate(args, device) -> dict:
    model = build_model(args.preset, device)
    if args.dtype != "fp32":
        model.to(DTYPES[args.dtype])  # inference: the weights themselves in bf16/fp16 (half the memory), no autocast
    model.eval()
    lengths = args.gen_lengths
    n_max = max(lengths)
    out = {"preset": args.preset, "dtype": args.dtype, "prompt_tokens": model.run_length + args.prompt_text,
           "new_tokens": lengths}
    print0(f"generate: preset {args.preset}, prompt {model.run_length} image + {args.prompt_text} text tokens, "
           f"greedy, dtype {args.dtype}")
    for i, B in enumerate(args.gen_batches):
        ids, _, pixel_values = synthetic_batch(model, B, model.run_length + args.prompt_text, device)
        if i == 0:
            _timed_generate(model, ids, pixel_values, 4, device)  # warm-up (first calls allocate)
        reset_peak_memory(device)
        stamps, end, _ = _timed_generate(model, ids, pixel_values, n_max, device)
        # Token 0 comes out of the prefill; token k >= 1 costs stamps[k+1] - stamps[k] (the last one
        # ends at `end`). Medians, as everywhere here: a shared machine adds random stalls.
        step_s = np.diff(stamps + [end])[1:]  # (n_max - 1,)
        r = {"prefill_ms": (stamps[1] - stamps[0]) * 1e3,
             "decode_tokens_per_s": B / float(np.median(step_s)),
             "e2e_tokens_per_s": B * n_max / (end - stamps[0]),
             # ms/token "at n": the median cost of tokens n/2+1 .. n, i.e. with about n tokens in the
             # cache. Flat across n = the KV cache keeps a step's cost independent of the length.
             "ms_per_token": {str(n): float(np.median(step_s[n // 2 - 1:n - 1])) * 1e3 for n in lengths},
             "peak_mem_mb": peak_memory_mb(device)}
        out[f"batch_{B}"] = r
        per = ", ".join(f"{v:.2f} @ {k}" for k, v in r["ms_per_token"].items())
        print0(f"  batch {B:<3} prefill {r['prefill_ms']:8.1f} ms, decode {r['decode_tokens_per_s']:8.1f} tok/s "
               f"(end to end {r['e2e_tokens_per_s']:.1f}); ms/token {per}")
    out["roofline"] = bench_memory.roofline(model, out[f"batch_{args.gen_batches[0]}"]["decode_tokens_per_s"],
                                            device, args.quick)
    del model
    out["inference_memory"] = bench_inference_memory(args, device)
    out["load_memory"] = bench_memory.report(args)  # CPU RAM of loading 26m + CLIP, in a fresh process
    return out


def bench_inference_memory(args, device) -> dict:
    """Memory to answer one prompt (196 + 32 tokens) with 64 new tokens, model in bf16.

    Measured on GPU (torch.cuda.max_memory_allocated: weights + activations + KV cache). On CPU the
    process RSS is a high-water mark of everything run before, so only the two big terms are computed.
    """
    cfg = vlm_preset(args.preset)
    n_new, T = 64 if not args.quick else 8, cfg.run_length + args.prompt_text
    out = {"dtype": "bf16", "prompt_tokens": T, "new_tokens": n_new,
           "kv_cache_mb": kv_cache_bytes(cfg.lm, T, n_new, bytes_per_value=2) / 2**20, "peak_mb": None}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        model = build_model(args.preset, device).to(torch.bfloat16).eval()
        ids, _, pixel_values = synthetic_batch(model, 1, T, device)
        reset_peak_memory(device)
        generate(model, ids, pixel_values.bfloat16(), cfg=SamplingConfig(max_new_tokens=n_new), eos_id=None)
        out["peak_mb"] = peak_memory_mb(device)
        del model
    with torch.device("meta"):  # shapes only: counts the parameters without allocating them
        total_params = sum(p.numel() for p in MiniMindVLM(cfg).parameters())
    out["weights_mb"] = total_params * 2 / 2**20
    print0(f"  inference memory (bf16, 1 x {T} + {n_new} tokens): weights {out['weights_mb']:.0f} MB, "
           f"KV cache {out['kv_cache_mb']:.2f} MB, measured peak "
           + (f"{out['peak_mb']:.0f} MB" if out["peak_mb"] is not None else "n/a on CPU"))
    return out


def bench_data(args) -> dict:
    cfg = vlm_preset(args.preset)
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="minivlm_bench_") as folder:
        jsonl = write_jsonl_dataset(folder, args.data_images, args.data_image_px)
        tok = (Tokenizer.from_file(args.tokenizer) if args.tokenizer
               else train_tokenizer([jsonl], vocab_size=400))  # tokenization cost barely depends on it
        ds = VLMDataset(jsonl, tokenizer=tok, max_length=cfg.run_length + 512, run_length=cfg.run_length,
                        image_size=cfg.vision.image_size)
        out = {"images": len(ds), "image_px": args.data_image_px, "image_size": cfg.vision.image_size,
               "batch": args.batch, "workers": workers}

        def rate(w, ds=ds):
            loader = DataLoader(ds, batch_size=args.batch, num_workers=w, persistent_workers=w > 0,
                                collate_fn=functools.partial(collate_vlm, pad_id=tok.pad_id))
            for _ in loader:  # warm-up pass: starts the workers, fills the page cache
                pass
            t0 = time.perf_counter()
            for _ in range(args.data_passes):
                for _ in loader:
                    pass
            return len(ds) * args.data_passes / (time.perf_counter() - t0)

        out["samples_per_s_main_process"] = rate(0)
        out["samples_per_s"] = rate(workers) if workers > 0 else out["samples_per_s_main_process"]
        # The same samples as one parquet file (images inside, row groups of 256 as `data repack` writes),
        # read in file order: what a worker does with the row groups `parquet.grouped_order` hands it.
        pq_path = os.path.join(folder, "data.parquet")
        with open(jsonl, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        write_parquet(pq_path, [(r["conversations"], [read_bytes(os.path.join(folder, r["image"]))]) for r in records],
                      row_group_size=256)
        pq = ParquetVLMDataset(pq_path, tokenizer=tok, max_length=cfg.run_length + 512, run_length=cfg.run_length,
                        image_size=cfg.vision.image_size)
        out["parquet_samples_per_s_main_process"] = rate(0, pq)
        out["parquet_samples_per_s"] = rate(workers, pq) if workers > 0 else out["parquet_samples_per_s_main_process"]
    print0(f"data: {out['images']} JPEGs {args.data_image_px}px -> {cfg.vision.image_size}px, batch {args.batch}: "
           f"jsonl + folder {out['samples_per_s']:.1f} samples/s with {workers} workers, "
           f"{out['samples_per_s_main_process']:.1f} in the main process; parquet "
           f"{out['parquet_samples_per_s']:.1f} with {workers} workers, "
           f"{out['parquet_samples_per_s_main_process']:.1f} in the main process")
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minivlm.bench", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("section", choices=["train", "generate", "decode", "data", "epoch", "all", "gpu"],
      help="what to measure (all = data, generate, train; decode: ms/token against the memory roofline; "
           "epoch: bench_epoch.py; "
           "gpu: the GPU run, with flags of its own: `python -m minivlm.bench gpu --help`)")
    a("--preset", default=None, choices=["26m", "tiny", "104m", "26m-moe"],
      help="model size (default 26m; tiny with --quick)")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    a("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
      help="train: autocast dtype; generate: the weights are cast to it (default fp32)")
    a("--batch", type=int, default=None, help="train and data batch size (default 4; 2 with --quick)")
    a("--seq-len", type=int, default=None,
      help="train tokens per sample, image run included (default 640; 96 with --quick)")
    a("--steps", type=int, default=None, help="timed repetitions (default 10 on GPU, 3 on CPU, 2 with --quick)")
    a("--warmup", type=int, default=None, help="untimed repetitions first (default 3 on GPU, 1 on CPU)")
    a("--workers", type=int, default=None, help="data: DataLoader workers (default min(16, cpus))")
    a("--tokenizer", default=None, help="data: tokenizer.json to use (default: train a small one on the fly)")
    a("--peak-tflops", type=float, default=None,
      help="peak TFLOP/s for MFU (default on GPU: H100 SXM dense, 989.4 bf16/fp16, 494.7 tf32; none on CPU)")
    a("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; 1 with --quick)")
    a("--json", default=None, metavar="OUT", help="also write all results to this JSON file")
    a("--quick", action="store_true", help="tiny model, small sizes, few steps (seconds on CPU; used by the tests)")
    return p


def resolve(args) -> argparse.Namespace:
    """Fill unset flags: --quick picks tiny sizes, otherwise the real ones."""
    quick = args.quick
    on_gpu = torch.device(args.device).type == "cuda"
    defaults = dict(preset="tiny" if quick else "26m", batch=2 if quick else 4, seq_len=96 if quick else 640,
                    steps=2 if quick else (10 if on_gpu else 3), warmup=1 if quick or not on_gpu else 3)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # Not flags: fixed sizes of the generate and data sections, smaller with --quick.
    if args.threads is None and quick:
        # The tiny model's ops are too small to split across threads; on a shared machine a second
        # thread mostly waits at OpenMP barriers for a core (10x slower decoding was seen on 2 cores).
        args.threads = 1
    args.prompt_text = 32
    args.gen_lengths = [8, 16, 32] if quick else [64, 256, 1024]
    args.gen_batches = [1, 2] if quick else [1, 8]
    args.data_images = 16 if quick else 256
    args.data_image_px = 128 if quick else 256
    args.data_passes = 1 if quick else 2
    if args.peak_tflops is None and on_gpu:
        args.peak_tflops = H100_PEAK_TFLOPS[args.dtype]
    return args


def main(argv=None) -> int:
    argv_list = sys.argv[1:] if argv is None else list(argv)
    if argv_list[:1] == ["gpu"]:  # a command of its own (gpu.py): its flags differ from the sections'
        return bench_gpu.main(argv_list[1:])
    args = build_parser().parse_args(argv)
    # None -> the GPU if there is one. On CUDA this also switches TF32 on, as training does, so that
    # fp32 matmuls run on the tensor cores (and H100_PEAK_TFLOPS["fp32"] is the TF32 rate).
    args.device = str(resolve_device(args.device))
    args = resolve(args)
    with cpu_threads(args.threads):
        results = run(args, argv)
    if args.json:
        atomic_write(args.json, json.dumps(results, indent=2).encode())
        print0(f"wrote {args.json}")
    return 0


def run(args, argv) -> dict:
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # how busy the machine was
    results = {"meta": {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "preset": args.preset,
        "dtype": args.dtype, "quick": args.quick, "peak_tflops": args.peak_tflops, "loadavg_1m_start": load,
        "argv": list(sys.argv[1:] if argv is None else argv)}}
    print0(f"minivlm bench: torch {torch.__version__}, {results['meta']['device_name']} ({device}), "
           f"{torch.get_num_threads()} threads" + (f", load average {load:.1f}" if load is not None else ""))
    sections = ["data", "generate", "train"] if args.section == "all" else [args.section]
    for section in sections:  # smallest memory first: on CPU the peak RSS only ever grows
        fn = {"train": bench_train, "generate": bench_generate, "decode": bench_decode,
              "data": lambda a, d: bench_data(a),
              "epoch": bench_epoch.bench_epoch}[section]
        results[section] = fn(args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "train" in results:
        r = results["train"]["ratios"]
        print0("ratios (baseline time / minivlm time; > 1 = minivlm faster):")
        print0(f"  (a) sdpa vs eager attention, train step      {r['sdpa_vs_eager']:.2f}x")
        print0(f"  (b) vectorised vs loop splice, splice op     {r['vectorised_vs_loop_splice']:.2f}x")
        print0(f"  (c) vision tower bf16 autocast vs fp32       {r['vision_bf16_vs_fp32']:.2f}x")
        print0(f"  minivlm vs baseline (eager + loop + vision fp32), train step  {r['minivlm_vs_baseline']:.2f}x")
    results["meta"]["loadavg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return results


if __name__ == "__main__":
    sys.exit(main())
