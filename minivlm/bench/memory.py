"""Inference memory on CPU: how much does loading a model cost beyond the weights it keeps?

`bench generate` calls `measure_load_memory`: it writes, in a temp dir, a 26m checkpoint (fp16, as
MiniMind-V saves them) and a *full* Hugging Face CLIP ViT-B/16 folder (vision and text towers, random
values of the real shapes: 599 MB in fp32, as the real `model.safetensors`), then loads them with
`checkpoint.load_vlm` in a fresh process per dtype and reports

    peak RSS of the load - RSS after the imports      (VmHWM: the process's high-water mark)
    ------------------------------------------------   = "load overhead ratio" (1.0 = nothing wasted)
    bytes of the parameters and buffers it keeps

and the same after a first answer (one image, 16 greedy tokens), the ratio the inference-memory goal
counts.
A fresh process, because the high-water mark never goes down: anything done before would count.

    python -m minivlm.bench.memory                                                  # the measurement alone
    python -m minivlm.bench.memory --weights W.pth --vision CLIP_DIR --dtype bf16   # the child's side
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile

import torch


def rss_peak_bytes() -> int:
    """The process's peak resident set. On Linux /proc's VmHWM: ru_maxrss would not do, because Linux
    carries it over from the parent through fork and exec (the child would report the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # macOS: bytes, Linux: KiB


def kept_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers, each storage once (tied weights share one)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------
# Files of the real sizes, written without holding them in memory


def write_safetensors_streaming(path, shapes: dict[str, tuple], make, dtype=torch.float32):
    """A .safetensors file of the given tensor shapes; `make(name, shape)` returns each tensor when
    its turn comes, so only one exists at a time (a 600 MB file needs no 600 MB of memory)."""
    from ..model.weights import _DTYPE_NAMES
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, shape in shapes.items():
            f.write(make(name, shape).to(dtype).reshape(-1).view(torch.uint8).numpy().tobytes())


def write_fake_clip_folder(folder) -> int:
    """A full openai/clip-vit-base-patch16-shaped folder (config.json + model.safetensors, both towers,
    random weights); returns the size of model.safetensors in bytes."""
    from ..clip.model import CLIPConfig, CLIPModel
    from ..model.config import VisionConfig
    os.makedirs(folder, exist_ok=True)
    with torch.device("meta"):  # shapes only
        shapes = {k: tuple(v.shape) for k, v in CLIPModel(CLIPConfig(vision=VisionConfig())).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    make = lambda name, shape: torch.randn(shape, generator=gen) * 0.02  # finite: load_vlm checks
    path = os.path.join(folder, "model.safetensors")
    write_safetensors_streaming(path, shapes, make)
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "image_size": 224, "patch_size": 16, "model_type": "clip_vision_model"}
    text = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
            "vocab_size": 49408, "max_position_embeddings": 77, "model_type": "clip_text_model"}
    cfg = {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 512,
           "text_config": text, "vision_config": vision}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return os.path.getsize(path)


def write_fake_checkpoint(path, preset: str = "26m"):
    """A random `preset` VLM checkpoint in fp16 (+ its JSON), built without a real vision tower."""
    from ..model.checkpoint import save_vlm
    from ..model.config import vlm_preset
    from ..model.vision import CLIPVisionModel
    from ..model.vlm import MiniMindVLM
    cfg = vlm_preset(preset)
    with torch.device("meta"):
        tower = CLIPVisionModel(cfg.vision)  # not saved in the checkpoint: shapes suffice
    save_vlm(MiniMindVLM(cfg, vision_model=tower), path, dtype=torch.float16)


# ---------------------------------------------------------------------------------------------
# Decode roofline: a one-token step at batch 1 reads every decoder weight once


def memory_bandwidth_gbs(device, mb: int = 256, reps: int = 5, huge_pages: bool = False) -> float | None:
    """Measured copy bandwidth (bytes read + written per second, GB/s): the median of `reps` copies
    of an mb-MiB buffer, big enough to miss every cache. huge_pages: both buffers in 2 MB pages
    (infer/hugepages.py; CPU only), None where the OS offers none."""
    import statistics
    import time
    from ..common import sync
    from ..infer.hugepages import huge_page_buffer
    n = mb * 2**20
    if huge_pages:
        if device.type != "cpu" or (a := huge_page_buffer(n)) is None:
            return None
        a, b = a.view(torch.float32).fill_(1), huge_page_buffer(n).view(torch.float32)
    else:
        a = torch.ones(n // 4, device=device)
        b = torch.empty_like(a)
    b.copy_(a)  # first touch: page faults are not bandwidth
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(times) / 1e9


def decoder_weight_bytes(model) -> int:
    """What one decode step reads: every weight but the vision tower's (not read after the prefill)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith("vision_encoder."))  # named_parameters counts the tied matrix once


def roofline(model, decode_tokens_per_s: float, device, quick: bool = False) -> dict:
    """Best possible batch-1 decode time = decoder weight bytes / memory bandwidth (the vision tower is
    not read after the prefill; the KV cache of a few hundred tokens is small beside the weights)."""
    weight_bytes = decoder_weight_bytes(model)
    bw = memory_bandwidth_gbs(device, 64 if quick else 256)
    best_ms, measured_ms = weight_bytes / (bw * 1e9) * 1e3, 1e3 / decode_tokens_per_s
    print(f"  roofline, batch 1: {weight_bytes / 2**20:.0f} MB of decoder weights / {bw:.1f} GB/s measured copy "
          f"bandwidth = {best_ms:.2f} ms/token at best; measured {measured_ms:.2f} ms/token "
          f"({100 * best_ms / measured_ms:.0f}% of the bound)", flush=True)
    return {"decoder_weight_mb": weight_bytes / 2**20, "bandwidth_gb_s": bw, "best_ms_per_token": best_ms,
            "measured_ms_per_token": measured_ms}


# ---------------------------------------------------------------------------------------------
# The measurement


def measure_load_memory(dtypes=("fp32", "bf16"), preset: str = "26m", vision: str | None = None) -> dict:
    """Write the files (vision=None: a fake full CLIP folder), then one child process per dtype."""
    out = {"preset": preset}
    with tempfile.TemporaryDirectory(prefix="minivlm_mem_") as folder:
        weights = os.path.join(folder, "vlm.pth")
        write_fake_checkpoint(weights, preset)
        if vision is None:
            vision = os.path.join(folder, "clip")
            out["clip_file_mb"] = write_fake_clip_folder(vision) / 2**20
        out["checkpoint_mb"] = os.path.getsize(weights) / 2**20
        for dtype in dtypes:
            cmd = [sys.executable, "-m", "minivlm.bench.memory", "--weights", weights, "--vision", vision,
                   "--dtype", dtype]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[dtype] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def report(args) -> dict:
    """bench generate's memory lines (the preset's decoder + a full ViT-B/16 CLIP folder)."""
    if args.quick:
        print("  load memory: skipped with --quick (it writes a 571 MB CLIP folder)", flush=True)
        return {}
    out = measure_load_memory(("fp32", "bf16"), args.preset)
    for dtype in ("fp32", "bf16"):
        r = out[dtype]
        print(f"  memory {dtype}: weights {r['weights_mb']:.0f} MB; RSS growth from the imports: load "
              f"{r['load_growth_mb']:.0f} MB ({r['load_overhead_ratio']:.2f}x the weights), first answer "
              f"{r['answer_growth_mb']:.0f} MB ({r['answer_overhead_ratio']:.2f}x)", flush=True)
    return out


def load_and_measure(weights, vision, dtype: str) -> dict:
    """The child's side: RSS after the imports; peak after load_vlm; peak after a first answer (one
    224-px image + 32 text tokens, 16 greedy tokens): what a user of eval_vlm.py pays for one question."""
    from ..common import DTYPES
    from ..infer.generate import SamplingConfig, generate
    from ..model.checkpoint import load_vlm
    from .baselines import synthetic_batch
    imports = rss_peak_bytes()
    model = load_vlm(weights, vision=vision, dtype=DTYPES[dtype]).eval()
    loaded, kept = rss_peak_bytes(), kept_bytes(model)
    ids, _, pixels = synthetic_batch(model, 1, model.run_length + 32, "cpu")
    generate(model, ids, pixels.to(DTYPES[dtype]), cfg=SamplingConfig(max_new_tokens=16), eos_id=None)
    answered = rss_peak_bytes()
    return {"rss_after_imports_mb": imports / 2**20, "weights_mb": kept / 2**20,
            "load_growth_mb": (loaded - imports) / 2**20, "answer_growth_mb": (answered - imports) / 2**20,
            "load_overhead_ratio": (loaded - imports) / kept, "answer_overhead_ratio": (answered - imports) / kept}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minivlm.bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=None, help="(child) checkpoint to load; without it: the whole measurement")
    p.add_argument("--vision", default=None, help="(child) CLIP folder")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--preset", default="26m", choices=["26m", "104m", "26m-moe"])
    args = p.parse_args(argv)
    if args.weights is None:  # python -m minivlm.bench.memory: what `bench generate` reports
        report(argparse.Namespace(quick=False, preset=args.preset))
    else:
        print(json.dumps(load_and_measure(args.weights, args.vision, args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
