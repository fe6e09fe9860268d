"""Benchmarks: how fast does minivlm train, generate and load data, and why.

    python -m minivlm.bench {train,generate,data,all} [--preset 26m] [--device cpu|cuda] [--dtype fp32|bf16|fp16]
                            [--batch 4] [--seq-len 640] [--steps N] [--warmup N] [--json OUT] [--quick]

Everything runs on random weights and synthetic inputs of the real shapes: the preset's decoder with
its CLIP tower (ViT-B/16 for 26m/104m/26m-moe, randomly initialised), a prompt made of one run of
`run_length` (196) placeholder ids followed by random text ids, pixel_values (B, 1, 3, 224, 224).
Speed does not depend on what the weights are, so no download is needed.

Sections (see README "## Benchmarks" for what each number means):
  train     one optimizer step (forward + backward + AdamW) with the SFT trainability: vision frozen,
            projector + whole decoder trained. Also the same step with hand-written ("eager")
            attention, and the "baseline" step = eager attention + a per-sample loop splice (MiniMind-V's
            way) + the vision tower forced to fp32. Plus two isolated comparisons: the splice op
            (loop vs vectorised) and the vision tower forward (fp32 vs bf16 autocast).
  generate  greedy decoding with `generate.generate` from a 196 + 32 token prompt, batch 1 and 8:
            prefill time, decode tokens/s, ms/token after 64, 256, 1024 new tokens; inference memory.
  data      N JPEGs + a MiniMind-V jsonl in a temp dir -> VLMDataset -> DataLoader(collate_vlm):
            samples/s of JPEG decoding + CLIP preprocessing + tokenization.

Timings are the median of `--steps` timed repetitions after `--warmup` untimed ones (the first calls
allocate memory, fill caches and, on GPU, pick kernels). On GPU every timed region ends with
torch.cuda.synchronize(), because kernels run asynchronously and the clock would otherwise stop early.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
import types
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from .config import LMConfig, VisionConfig, VLMConfig, vlm_preset
from .data import VLMDataset, collate_vlm
from .generate import SamplingConfig, generate
from .lm import Attention
from .tokenizer import Tokenizer, train_tokenizer
from .train import make_optimizer, set_trainable
from .vlm import MiniMindVLM

# Peak dense throughput of an H100 SXM (NVIDIA's datasheet, without 2:4 sparsity), in TFLOP/s.
# bf16/fp16 run on the tensor cores; fp32 matmuls run as TF32 here (enabled below, as train.py does).
H100_PEAK_TFLOPS = {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Counting FLOPs from the config
#
# A matmul of an (n, k) input with a (k, m) weight is 2·n·k·m FLOPs (one multiply + one add each).
# So a token going through the weights of a model costs 2·N FLOPs, N = the weights it multiplies
# with ("matmul parameters": biases, norms, embedding look-ups are ignored, they are O(N/width)).
# Backward costs twice the forward: one matmul for the gradient of the input, one for the weight.
# Attention scores add the part that grows with the sequence: q·k^T and weights·v are each
# 2·T·T·d per layer (d = heads × head_dim = hidden size), counted over the full T×T square as in
# PaLM's MFU definition. A causal kernel may skip the masked half: the count is a property of the
# model, not of the kernel, so MFU stays comparable between implementations.


def lm_matmul_params(c: LMConfig) -> int:
    """Decoder weights one token is multiplied with: attention + feed-forward per layer + lm_head.
    With MoE, only the experts a token is routed to (top-k routed + shared) and the router count."""
    d = c.hidden_size
    attn = 2 * d * c.num_attention_heads * c.head_dim + 2 * d * c.num_key_value_heads * c.head_dim  # q,o + k,v
    ffn = 3 * d * c.intermediate_size  # SwiGLU: gate, up, down
    if c.use_moe:
        ffn = ffn * (c.num_experts_per_tok + c.n_shared_experts) + d * c.n_routed_experts
    return c.num_hidden_layers * (attn + ffn) + c.vocab_size * d  # the tied lm_head is a real matmul


def vision_layers_run(v: VisionConfig) -> int:
    """select_features stops after the selected layer: later layers cost nothing."""
    return v.select_layer if v.select_layer >= 0 else v.num_hidden_layers + 1 + v.select_layer


def vision_forward_flops(v: VisionConfig) -> int:
    """Forward FLOPs of the vision tower for ONE image, up to the selected layer."""
    P, d = v.num_patches, v.hidden_size
    layer = 4 * d * d + 2 * d * v.intermediate_size  # q, k, v, out + fc1, fc2
    n = vision_layers_run(v)
    patch = 2 * P * v.num_channels * v.patch_size ** 2 * d  # the 16x16 stride-16 conv is a matmul per patch
    return patch + n * (2 * layer * (P + 1) + 4 * (P + 1) ** 2 * d)  # P patches + CLS


def projector_matmul_params(cfg: VLMConfig) -> int:
    dv, d = cfg.vision.hidden_size, cfg.lm.hidden_size
    return {"linear": dv * d, "mlp2x_gelu": dv * d + d * d, "identity": 0}[cfg.projector_type]


def train_step_flops(cfg: VLMConfig, batch: int, seq_len: int, images_per_sample: int = 1) -> dict:
    """FLOPs of one training step, by part (see the module comment and README "## Benchmarks").

    decoder    6·N_lm·T + 12·L·T²·d per sequence (forward 2N + attention 4LT²d, backward twice that)
    projector  4·N_proj·run_length per image: forward + weight gradient only (the frozen tower
               needs no input gradient)
    vision     forward only, 2·N_vis·197 + 4·L_v·197²·d_v per image (frozen, under no_grad)
    """
    c, T = cfg.lm, seq_len
    images = batch * images_per_sample
    parts = {
        "decoder": batch * (6 * lm_matmul_params(c) * T + 12 * c.num_hidden_layers * T * T * c.hidden_size),
        "projector": images * 4 * projector_matmul_params(cfg) * cfg.run_length,
        "vision": images * vision_forward_flops(cfg.vision),
    }
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------------------------------------
# Timing and memory


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Run fn warmup + steps times; return the wall-clock seconds of the timed runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """GPU: the most memory tensors held since the last reset. CPU: the process's peak resident set
    (ru_maxrss), a high-water mark that never goes down: it covers everything run so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # macOS: bytes, Linux: KiB


def _median(seconds: list[float]) -> float:
    return statistics.median(seconds)


# ---------------------------------------------------------------------------------------------
# Model and synthetic inputs


def build_model(preset: str, device: torch.device, seed: int = 0) -> MiniMindVLM:
    """A randomly initialised VLM of the preset (CLIP tower included), on device, in fp32."""
    torch.manual_seed(seed)
    return MiniMindVLM(vlm_preset(preset)).to(device)


def synthetic_batch(model: MiniMindVLM, batch: int, seq_len: int, device, seed: int = 0):
    """input_ids (B, seq_len) = one placeholder run + random text ids; labels = ids with the image
    positions set to -100 (as the datasets do); pixel_values (B, 1, 3, S, S) of random pixels."""
    L, V, pid = model.run_length, model.config.vocab_size, model.placeholder_id
    if seq_len <= L:
        raise SystemExit(f"error: --seq-len {seq_len} must exceed the image run of {L} placeholder tokens")
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, V, (batch, seq_len - L), generator=g)  # 0-2 are pad/bos/eos
    text[text == pid] = 3  # a stray placeholder id next to the run would break it
    ids = torch.cat([torch.full((batch, L), pid), text], dim=1)
    S = model.vlm_config.vision.image_size
    pixel_values = torch.randn(batch, 1, 3, S, S, generator=g)
    labels = ids.masked_fill(ids == pid, -100)
    return ids.to(device), labels.to(device), pixel_values.to(device)


# ---------------------------------------------------------------------------------------------
# Baselines


def loop_splice_images(self: MiniMindVLM, input_ids, embeds, pixel_values, image_counts=None):
    """MiniMind-V's splice (model_vlm.py: get_image_embeddings + count_vision_proj), re-created as the
    baseline for `MiniMindVLM.splice_images`. Swap it in with
        model.splice_images = types.MethodType(loop_splice_images, model)

    Like the original it encodes the images one slot at a time, finds the runs by comparing every
    window of run_length ids with the placeholder pattern, turns the matches into Python (start, end)
    pairs with .item(), and rebuilds each sample with torch.cat of slices in a Python loop. One fix:
    windows overlapping a run already replaced are skipped, so back-to-back images land where
    the vectorised version puts them (the original took the next matching window, one token after
    the first, and wrote the second image over most of the first).
    """
    if pixel_values.dim() == 4:
        pixel_values = pixel_values[:, None]
    B, N = pixel_values.shape[:2]
    T, L = input_ids.shape[1], self.run_length
    # (B, N, L, h): every slot is encoded, also the padding ones, as the original did.
    images = torch.stack([self.encode_images(pixel_values[:, i]) for i in range(N)], dim=1)
    if T < L:
        return embeds
    pattern = torch.full((L,), self.placeholder_id, device=input_ids.device)
    matches = (input_ids.unfold(1, L, 1) == pattern).all(dim=2)  # (B, T - L + 1)
    runs = {b: [(i.item(), i.item() + L - 1) for i in matches[b].nonzero(as_tuple=True)[0]]
            for b in range(B) if matches[b].any()}
    new_embeds = []
    for b in range(B):
        h = embeds[b]
        n_real = N if image_counts is None else int(image_counts[b])
        k, free_from = 0, 0
        for start, end in runs.get(b, []):
            if start < free_from or k >= n_real:
                continue
            h = torch.cat((h[:start], images[b, k].to(h.dtype), h[end + 1:]), dim=0)[:T]
            k, free_from = k + 1, end + 1
        new_embeds.append(h)
    return torch.stack(new_embeds, dim=0)


def _select_features_fp32(self, pixel_values, *args, **kwargs):
    """CLIPVisionModel.select_features with autocast switched off: the tower runs in fp32."""
    with torch.autocast(pixel_values.device.type, enabled=False):
        return type(self).select_features(self, pixel_values.float(), *args, **kwargs)


@contextlib.contextmanager
def variant(model: MiniMindVLM, attn: str = "sdpa", splice: str = "vectorised", vision_fp32: bool = False):
    """Temporarily switch the model to a baseline implementation; everything is restored after.

    attn: "sdpa" | "eager" (what LMConfig.attn_impl selects; set here on the built Attention modules,
    which copied it at construction). splice: "vectorised" | "loop" (loop_splice_images, bound on
    the instance). vision_fp32: keep the vision tower out of autocast.
    """
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    old = [m.attn_impl for m in attention]
    for m in attention:
        m.attn_impl = attn
    if splice == "loop":
        model.splice_images = types.MethodType(loop_splice_images, model)  # an instance attribute wins
    if vision_fp32:
        model.vision_encoder.select_features = types.MethodType(_select_features_fp32, model.vision_encoder)
    try:
        yield model
    finally:
        for m, impl in zip(attention, old):
            m.attn_impl = impl
        model.__dict__.pop("splice_images", None)
        model.vision_encoder.__dict__.pop("select_features", None)


# ---------------------------------------------------------------------------------------------
# Sections


def _autocast(device, dtype: str):
    amp = AMP_DTYPES[dtype]
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def _mfu(flops: float, seconds: float, peak_tflops: float | None):
    tflops = flops / seconds / 1e12
    return tflops, (tflops / peak_tflops if peak_tflops else None)


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
    # The optimizer of train.py (AdamW, decay groups; fused on GPU). A tiny lr: the weights barely
    # move, so every variant does the same work on (nearly) the same numbers.
    opt_args = SimpleNamespace(lr=1e-5, vision_lr=1e-5, weight_decay=0.01, device_type=device.type)
    optimizer = make_optimizer(model, opt_args)  # one for all variants: they differ in the forward only
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")

    def step():
        with _autocast(device, args.dtype):
            loss = model(ids, pixel_values, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train.py's default --grad-clip
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    out = {"preset": args.preset, "batch": B, "seq_len": T, "dtype": args.dtype, "steps": args.steps,
           "warmup": args.warmup, "trainable": "sft policy: set_trainable(model, 'sft', 0, False)",
           "params": {"lm_matmul": lm_matmul_params(cfg.lm), "projector_matmul": projector_matmul_params(cfg),
                      "vision_total": sum(p.numel() for p in model.vision_encoder.parameters()),
                      "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)},
           "flops_per_step": flops}
    log(f"train: preset {args.preset}, batch {B} x {T} tokens, dtype {args.dtype}, "
        f"{flops['total'] / 1e9:.1f} GFLOP/step (decoder {flops['decoder'] / 1e9:.1f}, "
        f"vision {flops['vision'] / 1e9:.1f}, projector {flops['projector'] / 1e9:.2f})")
    variants = {"minivlm": {}, "eager_attention": {"attn": "eager"},
                "baseline": {"attn": "eager", "splice": "loop", "vision_fp32": True}}
    times = {name: [] for name in variants}
    peaks = {name: 0.0 for name in variants}
    # Interleaved (A B C A B C ...) rather than all steps of A, then all of B: when the load of a
    # shared machine changes, it then slows every variant alike instead of the one that ran at the time.
    for rep in range(args.warmup + args.steps):
        for name, opts in variants.items():
            reset_peak_memory(device)
            with variant(model, **opts):
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                seconds = time.perf_counter() - t0
            peaks[name] = max(peaks[name], peak_memory_mb(device))
            if rep >= args.warmup:
                times[name].append(seconds)
    for name in variants:
        s = _median(times[name])
        tflops, mfu = _mfu(flops["total"], s, args.peak_tflops)
        r = out[name] = {"ms_per_step": s * 1e3, "samples_per_s": B / s, "tokens_per_s": B * T / s,
                         "peak_mem_mb": peaks[name], "tflops": tflops, "mfu": mfu,
                         "all_ms": [t * 1e3 for t in times[name]]}
        log(f"  {name:<16} {r['ms_per_step']:9.1f} ms/step {r['samples_per_s']:8.2f} samples/s "
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
    del model
    return out


def bench_splice(model, ids, pixel_values, args, device) -> dict:
    """The splice alone, loop vs vectorised, forward + backward, with the image features precomputed
    (so the vision tower, which both versions run alike, does not drown the difference)."""
    with torch.no_grad():
        feats = model.encode_images(pixel_values[:, 0])  # (B, L, h)
    embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
    with variant(model, splice="loop"):
        loop_out = model.splice_images(ids, embeds, pixel_values)
    vec_out = model.splice_images(ids, embeds, pixel_values)
    match = torch.allclose(loop_out, vec_out)  # tests/test_bench.py checks this exactly on small inputs

    model.encode_images = lambda pv: feats  # stub: both versions get the same ready features

    def run():
        model.splice_images(ids, embeds, pixel_values).sum().backward()

    try:
        reps = max(5, args.steps * 3)
        vec = _median(time_it(run, reps, max(1, args.warmup), device))
        with variant(model, splice="loop"):
            loop = _median(time_it(run, reps, max(1, args.warmup), device))
    finally:
        del model.encode_images
    log(f"  splice (fwd+bwd)  vectorised {vec * 1e3:.3f} ms, loop {loop * 1e3:.3f} ms -> "
        f"{loop / vec:.2f}x; outputs match: {match}")
    return {"vectorised_ms": vec * 1e3, "loop_ms": loop * 1e3, "match": bool(match)}


def bench_vision(model, pixel_values, args, device) -> dict:
    """The frozen vision tower's forward: fp32 vs bf16 autocast. On GPU on the batch's images; on CPU
    on one image, because bf16 without CPU support for it is emulated and takes many seconds per image."""
    images = pixel_values[:, 0] if device.type == "cuda" else pixel_values[:1, 0]
    tower = model.vision_encoder

    def run(dtype):
        with torch.no_grad(), _autocast(device, dtype):
            tower.select_features(images)

    fp32 = _median(time_it(lambda: run("fp32"), args.steps, args.warmup, device))
    bf16 = _median(time_it(lambda: run("bf16"), args.steps, args.warmup, device))
    log(f"  vision tower fwd  {images.shape[0]} images: fp32 {fp32 * 1e3:.1f} ms, bf16 autocast "
        f"{bf16 * 1e3:.1f} ms -> bf16 is {fp32 / bf16:.2f}x as fast")
    return {"images": images.shape[0], "fp32_ms": fp32 * 1e3, "bf16_ms": bf16 * 1e3}


def _timed_generate(model, ids, pixel_values, n_new: int, device) -> tuple[list[float], float]:
    """Greedy-generate n_new tokens; return the start time of every forward call and the end time.

    `generate` calls the model once for the prefill and once per further token; wrapping forward on
    the instance stamps the clock at each call, so one run yields the cost of every single token.
    """
    stamps = []
    forward = model.forward

    def stamped(*a, **kw):
        _sync(device)
        stamps.append(time.perf_counter())
        return forward(*a, **kw)

    model.forward = stamped
    try:
        generate(model, ids, pixel_values, cfg=SamplingConfig(max_new_tokens=n_new), eos_id=None)
        _sync(device)
    finally:
        del model.forward
    return stamps, time.perf_counter()


def bench_generate(args, device) -> dict:
    model = build_model(args.preset, device)
    amp = AMP_DTYPES[args.dtype]
    if amp is not None:
        model.to(amp)  # inference: the weights themselves in bf16/fp16 (half the memory), no autocast
    model.eval()
    lengths = args.gen_lengths
    n_max = max(lengths)
    out = {"preset": args.preset, "dtype": args.dtype, "prompt_tokens": model.run_length + args.prompt_text,
           "new_tokens": lengths}
    log(f"generate: preset {args.preset}, prompt {model.run_length} image + {args.prompt_text} text tokens, "
        f"greedy, dtype {args.dtype}")
    for i, B in enumerate(args.gen_batches):
        ids, _, pixel_values = synthetic_batch(model, B, model.run_length + args.prompt_text, device)
        if i == 0:
            _timed_generate(model, ids, pixel_values, 4, device)  # warm-up (first calls allocate)
        reset_peak_memory(device)
        stamps, end = _timed_generate(model, ids, pixel_values, n_max, device)
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
        log(f"  batch {B:<3} prefill {r['prefill_ms']:8.1f} ms, decode {r['decode_tokens_per_s']:8.1f} tok/s "
            f"(end to end {r['e2e_tokens_per_s']:.1f}); ms/token {per}")
    del model
    out["inference_memory"] = bench_inference_memory(args, device)
    return out


def bench_inference_memory(args, device) -> dict:
    """Memory to answer one prompt (196 + 32 tokens) with 64 new tokens, model in bf16.

    Measured on GPU (torch.cuda.max_memory_allocated: weights + activations + KV cache). On CPU the
    process RSS is a high-water mark of everything run before, so only the two big terms are computed.
    """
    cfg = vlm_preset(args.preset)
    n_new, T = 64 if not args.quick else 8, cfg.run_length + args.prompt_text
    c = cfg.lm
    # KVCache allocates exactly the prompt, then doubles its capacity when full.
    capacity = T
    while capacity < T + n_new - 1:
        capacity *= 2
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * capacity * 2  # k and v, bf16
    out = {"dtype": "bf16", "prompt_tokens": T, "new_tokens": n_new, "kv_cache_mb": kv_bytes / 2**20,
           "peak_mb": None}
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
    log(f"  inference memory (bf16, 1 x {T} + {n_new} tokens): weights {out['weights_mb']:.0f} MB, "
        f"KV cache {out['kv_cache_mb']:.2f} MB, measured peak "
        + (f"{out['peak_mb']:.0f} MB" if out["peak_mb"] is not None else "n/a on CPU"))
    return out


def _write_images(folder: str, n: int, size: int, seed: int = 0) -> list[str]:
    """n JPEGs of random-ish content: a colour gradient, a few shapes, some noise. Pure noise would be
    atypically slow to decode (JPEG compresses it badly); real photos sit between the two."""
    rng = np.random.default_rng(seed)
    names = []
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        pixels = c0 + (c1 - c0) * ramp[:, None, None] * ramp[None, :, None]  # diagonal gradient
        pixels += rng.normal(0, 8, pixels.shape)
        im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x0, y0 = rng.integers(0, size - 8, 2)
            x1, y1 = x0 + rng.integers(8, size // 2), y0 + rng.integers(8, size // 2)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        names.append(f"img_{i:05d}.jpg")
        im.save(os.path.join(folder, names[-1]), quality=90)
    return names


def bench_data(args) -> dict:
    cfg = vlm_preset(args.preset)
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    rnd = random.Random(0)
    words = "a red blue green small large square circle triangle on the left right of near picture".split()
    with tempfile.TemporaryDirectory(prefix="minivlm_bench_") as folder:
        names = _write_images(folder, args.data_images, args.data_image_px)
        jsonl = os.path.join(folder, "data.jsonl")
        with open(jsonl, "w", encoding="utf-8") as f:
            for name in names:
                answer = " ".join(rnd.choice(words) for _ in range(12)) + "."
                conv = [{"role": "user", "content": "<image>\nDescribe the picture."},
                        {"role": "assistant", "content": answer}]
                f.write(json.dumps({"conversations": conv, "image": name}) + "\n")
        tok = (Tokenizer.from_file(args.tokenizer) if args.tokenizer
               else train_tokenizer([jsonl], vocab_size=400))  # tokenization cost barely depends on it
        ds = VLMDataset(jsonl, tokenizer=tok, max_length=cfg.run_length + 512, run_length=cfg.run_length,
                        image_size=cfg.vision.image_size)
        out = {"images": len(ds), "image_px": args.data_image_px, "image_size": cfg.vision.image_size,
               "batch": args.batch, "workers": workers}

        def rate(w):
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
    log(f"data: {out['images']} JPEGs {args.data_image_px}px -> {cfg.vision.image_size}px, batch {args.batch}: "
        f"{out['samples_per_s']:.1f} samples/s with {workers} workers, "
        f"{out['samples_per_s_main_process']:.1f} samples/s in the main process")
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def log(msg: str):
    print(msg, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minivlm.bench", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("section", choices=["train", "generate", "data", "all"], help="what to measure")
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
    args = build_parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args = resolve(args)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = run(args, argv)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (the tests)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        log(f"wrote {args.json}")
    return 0


def run(args, argv) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py: fp32 matmuls on the tensor cores
        torch.backends.cudnn.allow_tf32 = True
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # how busy the machine was
    results = {"meta": {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "preset": args.preset,
        "dtype": args.dtype, "quick": args.quick, "peak_tflops": args.peak_tflops, "loadavg_1m_start": load,
        "argv": list(sys.argv[1:] if argv is None else argv)}}
    log(f"minivlm bench: torch {torch.__version__}, {results['meta']['device_name']} ({device}), "
        f"{torch.get_num_threads()} threads" + (f", load average {load:.1f}" if load is not None else ""))
    sections = ["data", "generate", "train"] if args.section == "all" else [args.section]
    for section in sections:  # smallest memory first: on CPU the peak RSS only ever grows
        fn = {"train": bench_train, "generate": bench_generate, "data": lambda a, d: bench_data(a)}[section]
        results[section] = fn(args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "train" in results:
        r = results["train"]["ratios"]
        log("ratios (baseline time / minivlm time; > 1 = minivlm faster):")
        log(f"  (a) sdpa vs eager attention, train step      {r['sdpa_vs_eager']:.2f}x")
        log(f"  (b) vectorised vs loop splice, splice op     {r['vectorised_vs_loop_splice']:.2f}x")
        log(f"  (c) vision tower bf16 autocast vs fp32       {r['vision_bf16_vs_fp32']:.2f}x")
        log(f"  minivlm vs baseline (eager + loop + vision fp32), train step  {r['minivlm_vs_baseline']:.2f}x")
    results["meta"]["loadavg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return results


if __name__ == "__main__":
    sys.exit(main())
