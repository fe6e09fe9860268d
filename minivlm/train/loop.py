"""The one training loop behind `train_pretrain.py` and `train_sft.py`.

Two stages, as in LLaVA and MiniMind-V:
  pretrain  image captions. The projector is trained (+ the last K decoder layers with
            --train-lm-layers K, or all of them with -1). Teaches the projector to "speak decoder".
  sft       instructions. Projector + the whole decoder trained. Teaches answering.
The CLIP tower stays frozen in both unless --train-vision (the tiny offline recipe trains it: no CLIP offline).

The run: `setup`, `build` (tokenizer, model, data), `restore` (--resume; resume.py), `train_step`, `log_step`, `save`.

What the loop guarantees:
  * one process or `torchrun --nproc_per_node N` (DDP; nccl on GPU, gloo on CPU), rank 0 logs/saves;
  * checkpoints written atomically (temp file + fsync + rename) every --save-every steps and at the end;
  * --resume continues exactly: same samples in the same order, same optimizer state, same RNG states,
    so a run killed at step k and resumed ends with the same weights, bit for bit (dropout included);
    the resume state is plain data (read with weights_only=True); changed data/step flags are refused;
  * Ctrl-C or SIGTERM stops at the next step boundary after saving a resume point;
  * a non-finite loss stops the run without overwriting the last good checkpoint;
  * a log line every --log-every steps with throughput and ETA, mirrored to a CSV for plotting.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gc
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset, DataLoader, Sampler

from ..synthetic.attention import AttentionTap, look_loss
from ..model.checkpoint import check_tokenizer, load_lm_weights, load_vlm, read_meta
from ..common import (Progress, UserError, autocast, fmt_time, grad_scaler, one_line, peak_memory_mb,
                     print0, resolve_device, resolve_dtype)
from ..model.config import vlm_preset
from ..data.dataset import DataError, VLMDataset, collate_vlm, data_summary
from .optim import lr_factor, make_optimizer, set_lr
from ..data.parquet import grouped_order
from ..data.processing import ImageLoadError
from .config import RECIPES, build_parser, parse_qtype_weights, resolve  # noqa: F401  (RECIPES: public API)
from .resume import (CSV_FIELDS, Paths, Saver, StopRequest, check_out, checkpoint_name, ignore_signals,
                     prepare_out, restore, save, stop_requested)
from ..data.tokenizer import Tokenizer
from ..model.vision import CLIPVisionModel
from ..model.vlm import MiniMindVLM
from ..model.weights import WeightsError


class EpochSampler(Sampler):
    """Shuffle with seed + epoch (identical on every rank), give rank r the indices r, r+W, r+2W, …
    (as DistributedSampler does), and optionally start `start` indices into the epoch — which is what
    an exact resume needs.

    With `group_sizes` (a parquet file's row groups) the shuffle is `parquet.grouped_order`: row groups
    in random order, rows shuffled within each, so a row group is read once per epoch and not once per
    sample (reading a row group costs milliseconds to a second)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, group_sizes=None, lengths=None,
                 batch_size: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.group_sizes = group_sizes
        self.lengths, self.batch_size = lengths, batch_size  # lengths: --group-by-length
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def indices(self):
        if self.group_sizes is not None:
            perm = torch.from_numpy(grouped_order(self.group_sizes, np.random.default_rng(self.seed + self.epoch)))
        else:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        if self.lengths is not None:
            perm = length_grouped(perm, self.lengths, self.batch_size * self.world, self.seed + self.epoch)
        per_rank = self.n // self.world  # equal shares, so all ranks take the same number of steps
        return perm[self.rank:per_rank * self.world:self.world][self.start:].tolist()

    def __iter__(self):
        return iter(self.indices())

    def __len__(self):
        return self.n // self.world - self.start


def length_grouped(perm: torch.Tensor, lengths, batch: int, seed: int, mega: int = 64) -> torch.Tensor:
    """LLaVA's length grouping: cut the shuffled order into "megabatches" of `mega` batches, sort each
    by length (longest first), cut it into batches, and shuffle the order of all batches. A batch then
    holds samples of similar length (little padding), while which samples meet stays random.
    `batch` = samples of one step across all ranks: rank r takes every world-th sample of a batch, so
    each rank's micro-batch comes from the same group. Deterministic in `seed`."""
    lengths = torch.as_tensor(lengths)
    chunks = [c[torch.argsort(lengths[c], descending=True, stable=True)] for c in perm.split(batch * mega)]
    batches = list(torch.cat(chunks).split(batch)) if chunks else []
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed + 1_000_003))
    return torch.cat([batches[i] for i in order.tolist()]) if batches else perm


def approx_lengths(dataset):
    """Per-sample approximate token counts of a dataset (or ConcatDataset) for --group-by-length."""
    parts = getattr(dataset, "datasets", [dataset])
    if not all(hasattr(d, "approx_lengths") for d in parts):
        raise UserError("--group-by-length needs --data files (synthetic data has no lengths to group by)")
    return np.concatenate([d.approx_lengths() for d in parts])


# ---------------------------------------------------------------------------------------------
# What is trained


def set_trainable(model: MiniMindVLM, stage: str, train_lm_layers: int, train_vision: bool):
    """Freeze everything, then unfreeze what this stage trains."""
    model.requires_grad_(False)
    model.vision_proj.requires_grad_(True)
    if stage == "sft" or train_lm_layers < 0:
        model.model.requires_grad_(True)  # includes the embeddings (and, when tied, the output layer)
        model.lm_head.requires_grad_(True)  # an untied output layer lives outside model.model
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


# ---------------------------------------------------------------------------------------------
# Setup and build


@dataclass
class Setup:
    """Where and how this process computes."""
    device: torch.device
    dtype: str  # "fp32" | "bf16" | "fp16"
    rank: int
    world: int


def setup(args) -> Setup:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(args.device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    args.dtype = resolve_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    return Setup(device, args.dtype, rank, world)


def build_model(stage, args, tokenizer) -> MiniMindVLM:
    if stage == "sft":
        init = args.init or checkpoint_name(args.out, "pretrain", vlm_preset(args.preset))
        if not os.path.isfile(init):
            raise UserError(f"{init}: no pretrain checkpoint to start SFT from (run train_pretrain.py, "
                            f"or pass --init)")
        model = load_vlm(init, vision=args.vision, **({} if args.dropout is None else {"dropout": args.dropout}))
        print0(f"initialised from {init}")
    else:
        cfg = vlm_preset(args.preset)
        cfg.lm.vocab_size = tokenizer.vocab_size  # a tokenizer trained offline may have fewer tokens
        cfg.placeholder_id = tokenizer.placeholder_id
        cfg.lm.dropout = cfg.lm.dropout if args.dropout is None else args.dropout
        cfg.lm.tie_word_embeddings = not args.untied_embeddings
        vision = CLIPVisionModel.from_pretrained(args.vision) if args.vision else None
        if vision is not None:
            cfg.vision = vision.config
        elif not args.train_vision:
            print0("warning: no --vision folder and --no-train-vision: the vision tower stays random")
        torch.manual_seed(args.seed)
        model = MiniMindVLM(cfg, vision_model=vision)
        if args.from_lm:
            load_lm_weights(model, args.from_lm)
            print0(f"decoder initialised from {args.from_lm}")
    trained_with = read_meta(init).get("tokenizer_vocab_size") if stage == "sft" else None
    check_tokenizer(model, tokenizer, args.tokenizer, trained_with)
    return model


def build_dataset(stage, args, tokenizer, cfg):
    # One file or several (a list, should --data take several): jsonl and parquet, picked by extension.
    paths = args.data if isinstance(args.data, (list, tuple)) else [args.data]
    if paths == ["synthetic"]:
        from ..synthetic.dataset import SyntheticVLMDataset
        look = getattr(args, "attn_sup", 0) > 0  # each sample also says where its answers' attention should go
        make = lambda kind, n, **kw: SyntheticVLMDataset(kind, n, args.seed, tokenizer, cfg.run_length,
                                                         args.max_length, image_size=cfg.vision.image_size,
                                                         look=look, **kw)
        n = args.synthetic_samples
        if stage == "pretrain":
            return make("pretrain", n)
        n_multi = int(n * args.multi_fraction)  # this share asks about two images (tiny: 1 in 5, else 1 in 8)
        weights = {**parse_qtype_weights(args.qtype_weights), "describe": args.describe_weight}
        sft = make("sft", n - n_multi, qtype_weights=weights, questions_per_image=args.questions_per_image)
        return ConcatDataset([sft, make("multi", n_multi)])
    parts = [VLMDataset(path, tokenizer=tokenizer, max_length=args.max_length, run_length=cfg.run_length,
                        image_size=cfg.vision.image_size, skip_bad=args.skip_bad,
                        **({} if str(path).endswith(".parquet") else {"images_dir": args.images}))
             for path in paths]
    if getattr(args, "features", None):  # the tower's output cached by `python -m minivlm.features`
        from .features import use_store
        use_store(args, parts[0] if len(parts) == 1 else ConcatDataset(parts), cfg.vision, paths)
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def question_first(dataset) -> bool:
    """Whether the training data asks before it shows (recorded in the checkpoint for inference)."""
    first = dataset.datasets[0] if isinstance(dataset, ConcatDataset) else dataset
    return bool(getattr(first, "question_first", False))


def build_loader(args, dataset, env: Setup, pad_id: int):
    lengths = approx_lengths(dataset) if getattr(args, "group_by_length", False) else None
    sampler = EpochSampler(len(dataset), args.seed, env.rank, env.world, getattr(dataset, "group_sizes", None),
                           lengths, args.batch_size)
    # Its own generator: starting an iterator draws the workers' base seed, which must not come from
    # (and advance) the global RNG that dropout uses, or a resumed run would drop different units.
    generator = torch.Generator()
    workers = args.num_workers if args.num_workers is not None else max(0, min(4, (os.cpu_count() or 1) - 1))
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=functools.partial(collate_vlm, pad_id=pad_id),
                        pin_memory=env.device.type == "cuda", num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                        generator=generator, worker_init_fn=ignore_signals if workers else None)
    steps_per_epoch = len(dataset) // env.world // args.batch_size // args.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} samples are fewer than one step of "
                        f"{args.batch_size} x {args.grad_accum} x {env.world} processes")
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    return sampler, loader, steps_per_epoch, total_steps


def attention_tap(args, model):
    """--attn-sup: an AttentionTap on the supervised layer (checked against the model), else None."""
    if not getattr(args, "attn_sup", 0):
        return None
    cfg = model.config
    if not 0 <= args.attn_sup_layer < cfg.num_hidden_layers:
        raise UserError(f"--attn-sup-layer {args.attn_sup_layer}: the decoder has layers 0..{cfg.num_hidden_layers - 1}")
    if not 0 <= args.attn_sup_head < cfg.num_attention_heads:
        raise UserError(f"--attn-sup-head {args.attn_sup_head}: the layer has heads 0..{cfg.num_attention_heads - 1}")
    if args.compile:
        raise UserError("--attn-sup does not combine with --compile (its hook would sit inside the compiled graph)")
    print0(f"attention supervision: head {args.attn_sup_head} of layer {args.attn_sup_layer}, weight {args.attn_sup}")
    return AttentionTap(model.model.layers[args.attn_sup_layer].self_attn)


def wrap_model(args, model, env: Setup):
    """The module the loop calls: compiled and/or wrapped in DDP; `model` itself is what gets saved."""
    train_model = model.compile_decoder() if args.compile else model  # the splice stays eager: no graph breaks
    if env.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=model.config.use_moe)  # an expert may get no tokens in a batch
    return train_model


# ---------------------------------------------------------------------------------------------
# One step, one log line


@dataclass
class Meter:
    """What happened since the last log line; kept on the device, so nothing syncs until we log."""
    loss: torch.Tensor
    tokens: torch.Tensor
    nonfinite: torch.Tensor
    on_target: torch.Tensor  # --attn-sup: the supervised head's attention on its target, summed over micro-batches
    samples: int = 0
    micro_batches: int = 0

    @classmethod
    def on(cls, device) -> "Meter":
        return cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long),
                   torch.zeros((), device=device, dtype=torch.bool), torch.zeros((), device=device))

    def reset(self):
        self.loss.zero_()
        self.tokens.zero_()
        self.on_target.zero_()
        self.samples = self.micro_batches = 0


def train_step(args, env: Setup, train_model, model, optimizer, scaler, batches, meter: Meter, tap=None):
    """One optimizer step over --grad-accum micro-batches. tap: --attn-sup's AttentionTap, else None."""
    for micro in range(args.grad_accum):
        batch = {k: v.to(env.device, non_blocking=True) for k, v in next(batches).items()}
        # No attention_mask: padding is on the right, so causal attention alone keeps real tokens
        # from seeing it, and padded positions carry label -100. This keeps the fused causal kernel.
        sync = micro == args.grad_accum - 1 or env.world == 1
        ctx = contextlib.nullcontext() if sync else train_model.no_sync()
        with ctx, autocast(env.device, env.dtype):
            # With --features the batch holds the tower's cached output instead of pixel_values.
            out = train_model(batch["input_ids"], batch.get("pixel_values"), labels=batch["labels"],
                              image_counts=batch["image_counts"], image_features=batch.get("image_features"))
            loss = out.loss
            if tap is not None and len(batch["look_rows"]):
                look, on_target = look_loss(tap, batch["look_rows"], batch["look_keys"], args.attn_sup_head)
                loss = loss + args.attn_sup * look
                meter.on_target += on_target.detach()
                meter.micro_batches += 1
            loss = loss / args.grad_accum
        scaler.scale(loss).backward()
        meter.loss += out.loss.detach() / args.grad_accum  # the log shows the language-model loss alone
        meter.nonfinite |= ~torch.isfinite(loss.detach())
        meter.tokens += batch["attention_mask"].sum()
        meter.samples += batch["input_ids"].shape[0] * env.world
    if args.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def log_step(args, env: Setup, paths: Paths, meter: Meter, progress: Progress, epoch, step, steps_logged, dt,
             lr):
    """Print one line and append the same numbers to the CSV."""
    eta, mean_loss = progress.eta(step), meter.loss.item() / steps_logged
    row = dict(epoch=epoch + 1, step=step, total_steps=progress.total, loss=round(mean_loss, 4),
               lr=f"{lr:.3g}", samples_per_s=round(meter.samples / dt, 1),
               tokens_per_s=round(meter.tokens.item() * env.world / dt, 1), elapsed_s=round(progress.elapsed(), 1),
               eta_s=round(eta, 1), peak_mem_mb=round(peak_memory_mb(env.device), 1),
               attn_on_target=round(meter.on_target.item() / meter.micro_batches, 3) if meter.micro_batches else "")
    print0(f"epoch {row['epoch']} step {step}/{progress.total} loss {mean_loss:.4f} lr {row['lr']} "
           f"{row['samples_per_s']:.1f} samples/s {row['tokens_per_s']:.0f} tok/s "
           f"elapsed {fmt_time(progress.elapsed())} ETA {fmt_time(eta)} peak {row['peak_mem_mb']:.0f} MB"
           + (f" attention on target {row['attn_on_target']:.2f}" if meter.micro_batches else ""))
    if env.rank == 0:
        with open(paths.csv, "a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS).writerow(row)
    meter.reset()


# ---------------------------------------------------------------------------------------------
# The run


def main(stage: str, argv=None) -> int:
    """Run one stage; a user's mistake (missing file, changed flags on --resume, bad data, weights or
    images) ends the run with a one-line error and exit code 2; a bug keeps its traceback."""
    args = build_parser(stage).parse_args(argv)
    try:
        return run(stage, resolve(stage, args))
    except (UserError, DataError, WeightsError, ImageLoadError) as e:
        print0(f"error: {one_line(e)}")  # also when raised in a DataLoader worker
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without a new resume point
        print0("interrupted; the last saved resume point is kept")
        return 130
    return 2


def check_inputs(args):
    """The files the run needs exist and the output folder is writable, before anything is built."""
    if not os.path.isfile(args.tokenizer) and not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        raise UserError(f"{args.tokenizer}: tokenizer not found (pass --tokenizer; "
                        f"`python -m minivlm.tokenizer train` makes one)")
    for path in args.data if isinstance(args.data, (list, tuple)) else [args.data]:
        if path == "synthetic":
            continue
        if not os.path.exists(path):
            raise UserError(f"--data {path}: no such file")
        if os.path.isdir(path):
            raise UserError(f"--data {path}: is a folder; --data takes a .jsonl or .parquet file "
                            f"(and --images the image folder)")
    check_out(args.out)


def load_tokenizer(path) -> Tokenizer:
    try:
        return Tokenizer.from_file(path)
    except (ValueError, OSError) as e:  # not JSON, not a tokenizer, unreadable
        raise UserError(f"{path}: not a usable tokenizer ({one_line(e)})") from None


def run(stage: str, args) -> int:
    env = setup(args)
    check_inputs(args)
    tokenizer = load_tokenizer(args.tokenizer)
    model = build_model(stage, args, tokenizer)
    set_trainable(model, stage, args.train_lm_layers, args.train_vision)
    model.to(env.device)
    cfg = model.vlm_config
    dataset = build_dataset(stage, args, tokenizer, cfg)
    sampler, loader, steps_per_epoch, total_steps = build_loader(args, dataset, env, tokenizer.pad_id)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.vision_lr, fused=env.device.type == "cuda")
    scaler = grad_scaler(env.device, env.dtype)
    train_model = wrap_model(args, model, env)
    tap = attention_tap(args, model)

    paths = Paths.of(args.out, stage, cfg)
    step = 0
    if args.resume:
        step = restore(paths.resume, args, env.world, model, optimizer, scaler)
        print0(f"resumed from {paths.resume} at step {step}/{total_steps}")
    if env.rank == 0:
        prepare_out(args, paths, step)
    print0(f"{stage}: preset {args.preset}, {len(dataset)} samples, {env.world} process(es), device {env.device}, "
           f"dtype {env.dtype}, {total_steps} steps of {args.batch_size * args.grad_accum * env.world} samples")
    print0("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in trainable_counts(model).items()))

    sv = Saver(stage, args, paths, env.world, question_first(dataset), tokenizer.vocab_size)
    with StopRequest() as stop:
        code = train_loop(args, env, sv, (train_model, model, optimizer, scaler, tap), (sampler, loader),
                          steps_per_epoch, total_steps, step, stop)
    if code == 0 and (line := data_summary(dataset)):  # None for synthetic data; under torchrun, rank 0's
        print0(f"data: {line}")
    if env.world > 1:
        dist.barrier()  # rank 0 may still be writing the last save: tear down together, not mid-write
        del train_model  # DDP freed after its process group aborts the process (about one run in four)
        gc.collect()
        dist.destroy_process_group()
    return code


def train_loop(args, env: Setup, sv: Saver, training, data, steps_per_epoch, total_steps, step, stop) -> int:
    """Steps from `step` to `total_steps`; 0 when done, 1 on a non-finite loss, 128 + signal number
    when Ctrl-C / SIGTERM stopped it (after saving a resume point)."""
    train_model, model, optimizer, scaler, tap = training
    sampler, loader = data
    model.train()
    progress, meter = Progress(total_steps, sv.stage, start=step), Meter.on(env.device)
    t_log, last_log_step, batches = progress.t0, step, None
    while step < total_steps:
        epoch, k = divmod(step, steps_per_epoch)
        if batches is None or k == 0:
            if batches is not None and (line := data_summary(loader.dataset)):
                print0(f"epoch {epoch} data: {line}")  # the epoch that just ended
            sampler.set_epoch(epoch, start=k * args.batch_size * args.grad_accum)
            loader.generator.manual_seed(args.seed + epoch)  # worker seeds: the same after a resume
            batches = iter(loader)
        factor = lr_factor(step, total_steps, args.warmup_steps, args.min_lr_ratio)
        set_lr(optimizer, factor)
        train_step(args, env, train_model, model, optimizer, scaler, batches, meter, tap)
        step += 1

        at_log = step % args.log_every == 0 or step == total_steps
        at_save = step % args.save_every == 0 or step == total_steps
        if (at_log or at_save) and bool(meter.nonfinite):
            print0(f"error: the loss became non-finite before step {step} (lr {args.lr}, dtype {env.dtype}); "
                   f"stopping. The last good checkpoint {sv.paths.ckpt} was not overwritten. Try a lower --lr, "
                   f"--dtype bf16 instead of fp16, or a smaller --grad-clip.")
            return 1
        if at_log:
            now = time.time()
            log_step(args, env, sv.paths, meter, progress, epoch, step, step - last_log_step, now - t_log,
                     args.lr * factor)
            t_log, last_log_step = now, step
        stopping = step < total_steps and stop_requested(stop, env.world, env.device)
        if at_save or stopping:  # every process: save() gathers their RNG states
            save(sv, model, optimizer, scaler, step, final=step == total_steps)
        if stopping:
            print0(f"stopped by {stop.name} after step {step}/{total_steps}; resume point saved in "
                   f"{sv.paths.resume}: run the same command with --resume to continue")
            return 128 + stop.signum
        if args.stop_after is not None and step >= args.stop_after:
            print0(f"stopping after step {step} (--stop-after)")
            break
    return 0
