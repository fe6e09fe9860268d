"""The one training loop behind `train_pretrain.py` and `train_sft.py`.

Two stages, as in LLaVA and MiniMind-V:
  pretrain  image captions. CLIP frozen, projector trained (+ the last K decoder layers with
            --train-lm-layers K, or all of them with -1). Teaches the projector to "speak decoder".
  sft       instructions. CLIP frozen, projector + the whole decoder trained. Teaches answering.

What the loop guarantees:
  * one process or `torchrun --nproc_per_node N` (DDP; nccl on GPU, gloo on CPU), rank 0 logs/saves;
  * checkpoints written atomically (temp file + fsync + rename) every --save-every steps and at the end;
  * --resume continues exactly: same samples in the same order, same optimizer state, same RNG states,
    so a run killed at step k and resumed ends with the same weights, bit for bit;
  * a non-finite loss stops the run without overwriting the last good checkpoint;
  * a log line every --log-every steps with throughput and ETA, mirrored to a CSV for plotting.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import math
import os
import random
import resource
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset, DataLoader, Sampler

from .checkpoint import load_lm_weights, load_vlm, save_vlm
from .config import vlm_preset
from .data import DataError, VLMDataset, collate_vlm
from .processing import ImageLoadError
from .tokenizer import Tokenizer
from .vision import CLIPVisionModel
from .vlm import MiniMindVLM
from .weights import WeightsError, atomic_torch_save

# Defaults per (stage, preset family). "real": MiniMind-V's recipe for the 26M model on its data
# (REFERENCE §6). "tiny": the CPU recipe that trains a working VLM on the synthetic world in minutes.
RECIPES = {
    ("pretrain", "real"): dict(lr=4e-4, batch_size=16, epochs=4, max_length=640, train_lm_layers=0,
                               warmup_steps=0, train_vision=False),
    ("sft", "real"): dict(lr=2e-5, batch_size=16, epochs=2, max_length=1536, train_lm_layers=-1,
                          warmup_steps=0, train_vision=False),
    ("pretrain", "tiny"): dict(lr=2e-3, batch_size=32, epochs=1, max_length=128, train_lm_layers=-1,
                               warmup_steps=100, train_vision=True, vision_lr=5e-4, data="synthetic",
                               max_steps=1200, synthetic_samples=1_000_000),
    ("sft", "tiny"): dict(lr=1e-3, batch_size=32, epochs=1, max_length=160, train_lm_layers=-1,
                          warmup_steps=50, train_vision=True, vision_lr=3e-4, data="synthetic",
                          max_steps=1500, synthetic_samples=1_000_000),
}
CSV_FIELDS = ["epoch", "step", "total_steps", "loss", "lr", "samples_per_s", "tokens_per_s",
              "elapsed_s", "eta_s", "peak_mem_mb"]


def build_parser(stage: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"train_{stage}.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=("Stage 1: caption pretraining (CLIP frozen, projector trained)." if stage == "pretrain" else
                     "Stage 2: instruction tuning (CLIP frozen, projector + whole decoder trained).")
        + " Flags left at None take the recipe default of --preset (26m/104m/26m-moe: MiniMind-V's "
          "recipe on real data; tiny: the offline CPU recipe on the synthetic world).")
    a = p.add_argument
    a("--preset", default="26m", choices=["26m", "104m", "26m-moe", "tiny"], help="model size")
    a("--data", default=None, help="MiniMind-V jsonl file, or 'synthetic' to render shapes scenes on the fly")
    a("--images", default=None, help="image folder of --data (default: the jsonl's folder)")
    a("--tokenizer", default=None, help="tokenizer.json or a folder holding it (default: --out/tokenizer.json)")
    a("--vision", default=None, help="Hugging Face CLIP folder (e.g. clip-vit-base-patch16); without it the "
                                     "tower starts random, which only makes sense with --train-vision")
    a("--out", default="out", help="output folder for checkpoints, logs and the resume state")
    if stage == "pretrain":
        a("--from-lm", default=None, help="initialise the decoder from a MiniMind LM .pth (else random)")
    else:
        a("--init", default=None, help="checkpoint to start from (default: the pretrain output in --out)")
    a("--train-lm-layers", type=int, default=None,
      help="also train the last K decoder layers (0 = projector only; -1 = the whole decoder)")
    a("--train-vision", action=argparse.BooleanOptionalAction, default=None,
      help="train the vision tower too (the tiny recipe does: it has no pretrained CLIP)")
    a("--vision-lr", type=float, default=None, help="learning rate of the vision tower (default: --lr)")
    a("--epochs", type=int, default=None, help="passes over the data")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (budget in steps)")
    a("--batch-size", type=int, default=None, help="samples per micro-batch per process")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, default=None, help="peak learning rate")
    a("--warmup-steps", type=int, default=None, help="linear warm-up steps before the cosine decay")
    a("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to lr * this")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay (never on norms and biases)")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    a("--max-length", type=int, default=None, help="tokens per sample; longer ones are cut after the last image")
    a("--skip-bad", action="store_true", help="skip (and count) bad samples instead of stopping at the first")
    a("--synthetic-samples", type=int, default=None, help="with --data synthetic: samples per epoch")
    a("--describe-weight", type=float, default=0.2,
      help="with --data synthetic (SFT): odds of a 'describe' question relative to each other question type")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="compute dtype (autocast); auto = bf16 on a GPU that supports it, else fp32")
    a("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--num-workers", type=int, default=None, help="DataLoader worker processes (default: min(4, cpus-1))")
    a("--threads", type=int, default=None,
      help="torch CPU threads (default: torch's choice); 1 is much faster on a CPU shared with other jobs")
    a("--seed", type=int, default=0, help="seed of initialisation, shuffling and synthetic data")
    a("--log-every", type=int, default=20, help="log every N optimizer steps")
    a("--save-every", type=int, default=500, help="save a checkpoint every N optimizer steps (and at the end)")
    a("--resume", action="store_true", help="continue from --out's resume state, exactly")
    a("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill at step k
    return p


def resolve(stage: str, args) -> argparse.Namespace:
    """Fill flags left at None from the recipe of --preset."""
    recipe = RECIPES[(stage, "tiny" if args.preset == "tiny" else "real")]
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.vision_lr is None:
        args.vision_lr = args.lr
    if args.data is None:
        raise SystemExit(f"error: --data is required for preset {args.preset} (a MiniMind-V jsonl file)")
    if args.tokenizer is None:
        args.tokenizer = os.path.join(args.out, "tokenizer.json")
    return args


# ---------------------------------------------------------------------------------------------
# Sampling that can resume mid-epoch

class EpochSampler(Sampler):
    """Shuffle with seed + epoch (identical on every rank), give rank r the indices r, r+W, r+2W, …
    (as DistributedSampler does), and optionally start `start` indices into the epoch — which is what
    an exact resume needs."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def indices(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.n // self.world  # equal shares, so all ranks take the same number of steps
        return perm[self.rank:per_rank * self.world:self.world][self.start:].tolist()

    def __iter__(self):
        return iter(self.indices())

    def __len__(self):
        return self.n // self.world - self.start


# ---------------------------------------------------------------------------------------------

def set_trainable(model: MiniMindVLM, stage: str, train_lm_layers: int, train_vision: bool):
    """Freeze everything, then unfreeze what this stage trains."""
    model.requires_grad_(False)
    model.vision_proj.requires_grad_(True)
    if stage == "sft" or train_lm_layers < 0:
        model.model.requires_grad_(True)  # includes the (tied) embeddings
    elif train_lm_layers > 0:
        for layer in model.model.layers[-train_lm_layers:]:
            layer.requires_grad_(True)
    if train_vision:
        for module in model.vision_encoder.feature_modules():
            module.requires_grad_(True)


def trainable_counts(model) -> dict:
    counts = {"vision": 0, "projector": 0, "lm": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = "vision" if name.startswith("vision_encoder.") else (
                "projector" if name.startswith("vision_proj.") else "lm")
            counts[part] += p.numel()
    return counts


def make_optimizer(model, args):
    """AdamW with four groups: (decoder+projector | vision) x (decay | no decay on norms and biases)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        vision = name.startswith("vision_encoder.")
        decay = p.dim() >= 2 and "embedding" not in name.split(".")[-2]  # no decay: norms, biases, pos/cls emb
        key = (vision, decay)
        if key not in groups:
            lr = args.vision_lr if vision else args.lr
            groups[key] = {"params": [], "weight_decay": args.weight_decay if decay else 0.0, "base_lr": lr}
        groups[key]["params"].append(p)
    fused = args.device_type == "cuda"
    return torch.optim.AdamW(list(groups.values()), lr=args.lr, betas=(0.9, 0.95), fused=fused)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine from 1 down to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_dataset(stage, args, tokenizer, cfg):
    if args.data == "synthetic":
        from .synthetic import SyntheticVLMDataset
        make = lambda kind, n, **kw: SyntheticVLMDataset(kind, n, args.seed, tokenizer, cfg.run_length,
                                                         args.max_length, image_size=cfg.vision.image_size, **kw)
        n = args.synthetic_samples
        if stage == "pretrain":
            return make("pretrain", n)
        # 1 in 8 samples asks about two images. Captions ("describe") are rarer than the other question
        # types: their long answers would otherwise dominate the token-averaged loss.
        return ConcatDataset([make("sft", n - n // 8, qtype_weights={"describe": args.describe_weight}),
                              make("multi", n // 8)])
    return VLMDataset(args.data, tokenizer=tokenizer, images_dir=args.images, max_length=args.max_length,
                      run_length=cfg.run_length, image_size=cfg.vision.image_size, skip_bad=args.skip_bad)


def build_model(stage, args, tokenizer):
    if stage == "sft":
        init = args.init or checkpoint_name(args.out, "pretrain", vlm_preset(args.preset))
        if not os.path.isfile(init):
            raise SystemExit(f"error: {init}: no pretrain checkpoint to start SFT from (run train_pretrain.py, "
                             f"or pass --init)")
        model = load_vlm(init, vision=args.vision)
        log(f"initialised from {init}")
    else:
        cfg = vlm_preset(args.preset)
        cfg.lm.vocab_size = tokenizer.vocab_size  # a tokenizer trained offline may have fewer tokens
        vision = CLIPVisionModel.from_pretrained(args.vision) if args.vision else None
        if vision is not None:
            cfg.vision = vision.config
        elif not args.train_vision:
            log("warning: no --vision folder and --no-train-vision: the vision tower stays random")
        torch.manual_seed(args.seed)
        model = MiniMindVLM(cfg, vision_model=vision, placeholder_id=tokenizer.placeholder_id)
        if args.from_lm:
            load_lm_weights(model, args.from_lm)
            log(f"decoder initialised from {args.from_lm}")
    if model.config.vocab_size < tokenizer.vocab_size:
        raise SystemExit(f"error: tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    if model.placeholder_id != tokenizer.placeholder_id:
        raise SystemExit(f"error: the model's placeholder id {model.placeholder_id} is not the tokenizer's "
                         f"'@' id {tokenizer.placeholder_id}")
    return model


def checkpoint_name(out, stage, cfg) -> str:
    return os.path.join(out, f"{stage}_vlm_{cfg.lm.hidden_size}{'_moe' if cfg.lm.use_moe else ''}.pth")


_RANK = 0


def log(msg):
    if _RANK == 0:
        print(msg, flush=True)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def main(stage: str, argv=None) -> int:
    """Run one stage; bad data, weights or images end the run with a one-line error and exit code 2."""
    args = resolve(stage, build_parser(stage).parse_args(argv))
    try:
        return run(stage, args)
    except (DataError, WeightsError, ImageLoadError) as e:
        log(f"error: {e}")
    except Exception as e:
        # An error inside a DataLoader worker arrives re-wrapped with the worker's traceback: show
        # its last line, which is the DataError message naming file:line.
        last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        if "DataError" not in str(e) and "SampleTooLong" not in str(e):
            raise
        log(f"error: {last.split(': ', 1)[-1]}")
    return 2


def run(stage: str, args) -> int:
    global _RANK

    # --- processes and devices ------------------------------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    _RANK = rank
    if args.device is None:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    args.device_type = device.type
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # --- tokenizer, model, data -----------------------------------------------------------
    if not os.path.exists(args.tokenizer):
        raise SystemExit(f"error: {args.tokenizer}: tokenizer not found (pass --tokenizer; "
                         f"`python -m minivlm.tokenizer train` makes one)")
    tokenizer = Tokenizer.from_file(args.tokenizer)
    model = build_model(stage, args, tokenizer)
    set_trainable(model, stage, args.train_lm_layers, args.train_vision)
    model.to(device)
    cfg = model.vlm_config
    dataset = build_dataset(stage, args, tokenizer, cfg)
    sampler = EpochSampler(len(dataset), args.seed, rank, world)
    workers = args.num_workers if args.num_workers is not None else max(0, min(4, (os.cpu_count() or 1) - 1))
    loader_kw = dict(num_workers=workers, persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=functools.partial(collate_vlm, pad_id=tokenizer.pad_id),
                        pin_memory=device.type == "cuda", **loader_kw)
    steps_per_epoch = len(dataset) // world // args.batch_size // args.grad_accum
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} samples are fewer than one step of "
                         f"{args.batch_size} x {args.grad_accum} x {world} processes")
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    optimizer = make_optimizer(model, args)
    train_model = model
    if args.compile:
        train_model = torch.compile(model)
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.lm.use_moe)  # an expert may get no tokens in a batch

    os.makedirs(args.out, exist_ok=True)
    resume_path = os.path.join(args.out, f"resume_{stage}.pt")
    ckpt_path = checkpoint_name(args.out, stage, cfg)
    csv_path = os.path.join(args.out, f"log_{stage}.csv")
    step = 0
    if args.resume:
        if not os.path.isfile(resume_path):
            raise SystemExit(f"error: --resume but {resume_path} does not exist")
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        set_rng_state(state["rng"])
        log(f"resumed from {resume_path} at step {step}/{total_steps}")
    if rank == 0:
        tok_file = os.path.join(args.tokenizer, "tokenizer.json") if os.path.isdir(args.tokenizer) else args.tokenizer
        tok_copy = os.path.join(args.out, "tokenizer.json")
        if os.path.abspath(tok_file) != os.path.abspath(tok_copy):
            shutil.copyfile(tok_file, tok_copy)  # the output folder is self-contained
        if not args.resume or not os.path.isfile(csv_path):
            with open(csv_path, "w", newline="") as f:
                csv.writer(f).writerow(CSV_FIELDS)

    counts = trainable_counts(model)
    log(f"{stage}: preset {args.preset}, {len(dataset)} samples, {world} process(es), device {device}, "
        f"dtype {args.dtype}, {total_steps} steps of {args.batch_size * args.grad_accum * world} samples")
    log("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))

    def save(final=False):
        if rank != 0:
            return
        vision_dir = None
        if args.train_vision:  # a trained tower must travel with the checkpoint
            vision_dir = os.path.join(args.out, f"{stage}_vision")
            model.vision_encoder.save_pretrained(vision_dir)
        # The synthetic SFT data asks its questions before the images (see synthetic._turns).
        save_vlm(model, ckpt_path, vision_folder=vision_dir, question_first=stage == "sft" and args.data == "synthetic")
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "step": step, "rng": rng_state(), "args": vars(args)}
        atomic_torch_save(state, resume_path)
        log(f"saved {ckpt_path}" + (" (final)" if final else f" at step {step}"))

    # --- the loop -------------------------------------------------------------------------
    model.train()
    t0 = t_log = time.time()
    loss_sum = torch.zeros((), device=device)  # accumulated on the device: no sync until we log
    tokens = torch.zeros((), device=device, dtype=torch.long)
    nonfinite = torch.zeros((), device=device, dtype=torch.bool)
    samples_since, step_at_start, last_log_step = 0, step, step
    it = None
    while step < total_steps:
        epoch, k = divmod(step, steps_per_epoch)
        if it is None or k == 0:
            sampler.set_epoch(epoch, start=k * args.batch_size * args.grad_accum)
            it = iter(loader)
        factor = lr_factor(step, total_steps, args.warmup_steps, args.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        for micro in range(args.grad_accum):
            batch = next(it)
            batch = {k_: v.to(device, non_blocking=True) for k_, v in batch.items()}
            # No attention_mask: padding is on the right, so causal attention alone keeps real tokens
            # from seeing it, and padded positions carry label -100. This keeps the fused causal kernel.
            sync = micro == args.grad_accum - 1 or world == 1
            ctx = contextlib.nullcontext() if sync else train_model.no_sync()
            with ctx, autocast:
                out = train_model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"],
                                  image_counts=batch["image_counts"])
                loss = out.loss / args.grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
            nonfinite |= ~torch.isfinite(loss.detach())
            tokens += batch["attention_mask"].sum()
            samples_since += batch["input_ids"].shape[0] * world
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        at_log = step % args.log_every == 0 or step == total_steps
        at_save = step % args.save_every == 0 or step == total_steps
        if (at_log or at_save) and bool(nonfinite):
            log(f"error: the loss became non-finite before step {step} (lr {args.lr}, dtype {args.dtype}); "
                f"stopping. The last good checkpoint {ckpt_path} was not overwritten. Try a lower --lr, "
                f"--dtype bf16 instead of fp16, or a smaller --grad-clip.")
            return 1
        if at_log:
            now = time.time()
            mean_loss = loss_sum.item() / (step - last_log_step)
            dt = now - t_log
            rate_steps = (step - step_at_start) / max(1e-9, now - t0)
            row = dict(epoch=epoch + 1, step=step, total_steps=total_steps, loss=round(mean_loss, 4),
                       lr=f"{args.lr * factor:.3g}", samples_per_s=round(samples_since / dt, 1),
                       tokens_per_s=round(tokens.item() * world / dt, 1), elapsed_s=round(now - t0, 1),
                       eta_s=round((total_steps - step) / max(1e-9, rate_steps), 1),
                       peak_mem_mb=round(peak_memory_mb(device), 1))
            log(f"epoch {row['epoch']} step {step}/{total_steps} loss {mean_loss:.4f} lr {row['lr']} "
                f"{row['samples_per_s']:.1f} samples/s {row['tokens_per_s']:.0f} tok/s "
                f"elapsed {fmt_time(now - t0)} ETA {fmt_time(row['eta_s'])} peak {row['peak_mem_mb']:.0f} MB")
            if rank == 0:
                with open(csv_path, "a", newline="") as f:
                    csv.DictWriter(f, CSV_FIELDS).writerow(row)
            loss_sum.zero_()
            tokens.zero_()
            samples_since, t_log, last_log_step = 0, now, step
        if at_save:
            save(final=step == total_steps)
        if args.stop_after is not None and step >= args.stop_after:
            log(f"stopping after step {step} (--stop-after)")
            break
    if isinstance(dataset, VLMDataset) and args.skip_bad:
        log(dataset.bad_summary() + " (counted in the main process; workers count their own)")
    if world > 1:
        dist.destroy_process_group()
    return 0
