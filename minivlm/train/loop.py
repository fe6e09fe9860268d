"""The one training loop behind `train_pretrain.py` and `train_sft.py`.

Two stages, as in LLaVA and MiniMind-V:
  pretrain  image captions. The projector is trained (+ the last K decoder layers with
            --train-lm-layers K, or all of them with -1). Teaches the projector to "speak decoder".
  sft       instructions. Projector + the whole decoder trained. Teaches answering.
The CLIP tower stays frozen in both unless --train-vision (the tiny offline recipe trains it: no CLIP offline).

The run: `setup`, `build` (tokenizer, model, data source), `restore` (--resume; resume.py), `train_step`,
`log_step`, `save`. The configuration is one `TrainConfig` (config.py), built from the command line once.

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
import functools
import gc
import os
import random
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset, DataLoader

from ..common import (Progress, UserError, autocast, fmt_time, grad_scaler, one_line, peak_memory_mb,
                      print0, resolve_device, resolve_dtype)
from ..data.dataset import DataError, collate_vlm, data_summary
from ..data.parquet import open_dataset
from ..data.processing import ImageLoadError
from ..data.tokenizer import Tokenizer
from ..model.checkpoint import check_tokenizer, load_lm_weights, load_vision_tower, load_vlm, read_meta
from ..model.config import vlm_preset
from ..model.siglip import SiglipVisionModel
from ..model.vlm import MiniMindVLM
from ..model.weights import WeightsError
from .config import TrainConfig, parse
from .features import build_store, use_store
from .optim import lr_factor, make_optimizer, set_lr, set_trainable, trainable_counts
from .resume import (Paths, Saver, StopRequest, append_log, check_out, checkpoint_name, ignore_signals,
                     prepare_out, restore, save, stop_requested)
from .sampler import EpochSampler, approx_lengths, read_groups


# ---------------------------------------------------------------------------------------------
# Setup and build


@dataclass
class Setup:
    """Where and how this process computes."""
    device: torch.device
    dtype: str  # "fp32" | "bf16" | "fp16"
    rank: int
    world: int


def setup(cfg: TrainConfig) -> Setup:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg.device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return Setup(device, resolve_dtype(cfg.dtype, device), rank, world)


def build_model(cfg: TrainConfig, tokenizer) -> MiniMindVLM:
    if cfg.stage == "sft":
        init = cfg.init or checkpoint_name(cfg.out, "pretrain", vlm_preset(cfg.preset))
        if not os.path.isfile(init):
            raise UserError(f"{init}: no pretrain checkpoint to start SFT from (run train_pretrain.py, "
                            f"or pass --init)")
        model = load_vlm(init, vision=cfg.vision, **({} if cfg.dropout is None else {"dropout": cfg.dropout}))
        print0(f"initialised from {init}")
    else:
        vlm_cfg = vlm_preset(cfg.preset)
        vlm_cfg.lm.vocab_size = tokenizer.vocab_size  # a tokenizer trained offline may have fewer tokens
        vlm_cfg.placeholder_id = tokenizer.placeholder_id
        vlm_cfg.lm.dropout = vlm_cfg.lm.dropout if cfg.dropout is None else cfg.dropout
        vlm_cfg.lm.tie_word_embeddings = not cfg.untied_embeddings
        vision = load_vision_tower(cfg.vision) if cfg.vision else None
        if vision is not None and isinstance(vision, SiglipVisionModel) != (vlm_cfg.vision_type == "siglip"):
            raise UserError(f"--vision {cfg.vision}: a {type(vision).__name__[:-11]} folder, but --preset "
                            f"{cfg.preset} needs {'SigLIP (minimind-3v)' if vlm_cfg.vision_type == 'siglip' else 'CLIP'}")
        if vision is not None:
            vlm_cfg.vision = vision.config
        elif not cfg.train_vision:
            print0("warning: no --vision folder and --no-train-vision: the vision tower stays random")
        torch.manual_seed(cfg.seed)
        model = MiniMindVLM(vlm_cfg, vision_model=vision)
        if cfg.from_lm:
            load_lm_weights(model, cfg.from_lm)
            print0(f"decoder initialised from {cfg.from_lm}")
    trained_with = read_meta(init).get("tokenizer_vocab_size") if cfg.stage == "sft" else None
    check_tokenizer(model, tokenizer, cfg.tokenizer, trained_with)
    return model


class FileData:
    """The data source of MiniMind-V files (jsonl and parquet, picked by extension), optionally read through
    the frozen tower's feature cache. A data source gives the loop a dataset, a collate function and,
    optionally, an extra loss term; the shapes world is the other source (synthetic/training.py)."""

    def __init__(self, cfg: TrainConfig, tokenizer, vlm_cfg, env=None):
        parts = [open_dataset(path, tokenizer=tokenizer, max_length=cfg.max_length, run_length=vlm_cfg.run_length,
                            image_size=vlm_cfg.image_transform, skip_bad=cfg.skip_bad,
                            **({} if str(path).endswith(".parquet") else {"images_dir": cfg.images}))
                 for path in cfg.data]
        self.dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        # the tower's output cached by `python -m minivlm.features`, or automatically (auto_cache)
        if cfg.features:
            use_store(cfg, self.dataset, vlm_cfg.vision, cfg.data)
        else:
            auto_cache(cfg, self.dataset, vlm_cfg.vision, env)

    def collate(self, pad_id: int):
        return functools.partial(collate_vlm, pad_id=pad_id)

    def extra_loss(self, model, cfg):
        return None


def auto_cache(cfg: TrainConfig, dataset, vision_config, env) -> str | None:
    """--feature-cache auto (the default): a frozen CLIP tower over several epochs would compute the same
    features every epoch, so they are computed once, before the first step, into OUT/feature_cache/ in fp32
    (training stays bit-identical to running the tower). A later run or --resume reuses the store while its
    data, images and tower are unchanged, else it is rebuilt. Skipped, with the commands to do it by hand,
    when it would fill more than half the free disk. The store, checked, is attached to `dataset`."""
    if cfg.feature_cache != "auto" or not cfg.vision or cfg.train_vision or cfg.epochs < 2:
        return
    if not hasattr(vision_config, "select_feature"):
        print0("feature cache: not for a SigLIP tower (minimind-3v): the tower runs on every step")
        return
    folder = os.path.join(cfg.out, "feature_cache")
    os.makedirs(cfg.out, exist_ok=True)
    rows = vision_config.num_patches + (vision_config.select_feature == "cls_patch")
    need, free = len(dataset) * rows * vision_config.hidden_size * 4, shutil.disk_usage(cfg.out).free
    if need > free / 2:  # about one image per sample (MiniMind-V's pretrain data)
        print0(f"feature cache: skipped: about {need / 2**30:.1f} GiB for {len(dataset)} samples, "
               f"{free / 2**30:.1f} GiB free\n{feature_cache_tip(cfg)}")
        return
    reused = False
    if env is None or env.rank == 0:
        try:  # one check (weights sha256, every image's stamp) decides between reusing and rebuilding
            use_store(cfg, dataset, vision_config, cfg.data, folder, dtype="fp32")
            print0(f"feature cache: reusing {folder}")
            reused = True
        except (UserError, WeightsError, OSError) as e:
            why = "" if not os.path.exists(os.path.join(folder, "manifest.json")) else f" ({one_line(e)})"
            print0(f"feature cache: the frozen tower runs once per image, into {folder}{why}; "
                   f"--feature-cache off skips this")
            build_store(cfg.data, cfg.images, cfg.vision, folder, dtype="fp32", device=env.device if env else "cpu")
    if env is not None and env.world > 1:
        dist.barrier()  # the other processes read the store rank 0 has just written
    if not reused:
        use_store(cfg, dataset, vision_config, cfg.data, folder, dtype="fp32")


def feature_cache_tip(cfg: TrainConfig) -> str:
    """The frozen tower computes the same features every epoch: say, with the exact commands, how to compute
    them once. (docs/benchmarks.md: a cached pretrain epoch took half the CPU time, 11.6 vs 22.9 s, and
    building the store cost about one uncached epoch, so it pays from the second epoch on.)"""
    store = os.path.join(cfg.out, "features")
    images = f" --images {cfg.images}" if cfg.images else ""
    return (f"tip: the vision tower is frozen, so each of the {cfg.epochs} epochs recomputes the same image "
            f"features; compute them once, then train on them (same weights with --dtype fp32):\n"
            f"  python -m minivlm.features --data {' '.join(cfg.data)}{images} --vision {cfg.vision} --out {store}\n"
            f"  ... and add --features {store} to this command")


def data_source(cfg: TrainConfig, tokenizer, vlm_cfg, env=None):
    if cfg.synthetic:
        # Imported only for its own data: training on files never loads the shapes world.
        from ..synthetic.training import ShapesTraining
        return ShapesTraining(cfg.stage, cfg, tokenizer, vlm_cfg)
    return FileData(cfg, tokenizer, vlm_cfg, env)


def question_first(dataset) -> bool:
    """Whether the training data asks before it shows (recorded in the checkpoint for inference)."""
    first = dataset.datasets[0] if isinstance(dataset, ConcatDataset) else dataset
    return bool(getattr(first, "question_first", False))


def build_loader(cfg: TrainConfig, dataset, collate, env: Setup):
    lengths = approx_lengths(dataset) if cfg.group_by_length else None
    sampler = EpochSampler(len(dataset), cfg.seed, env.rank, env.world, read_groups(dataset), lengths,
                           cfg.batch_size)
    # Its own generator: starting an iterator draws the workers' base seed, which must not come from
    # (and advance) the global RNG that dropout uses, or a resumed run would drop different units.
    generator = torch.Generator()
    workers = cfg.num_workers if cfg.num_workers is not None else max(0, min(4, (os.cpu_count() or 1) - 1))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, collate_fn=collate,
                        pin_memory=env.device.type == "cuda", num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                        generator=generator, worker_init_fn=ignore_signals if workers else None)
    steps_per_epoch = len(dataset) // env.world // cfg.batch_size // cfg.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} samples are fewer than one step of "
                        f"{cfg.batch_size} x {cfg.grad_accum} x {env.world} processes")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return sampler, loader, steps_per_epoch, total_steps


def wrap_model(cfg: TrainConfig, model, env: Setup):
    """The module the loop calls: compiled and/or wrapped in DDP; `model` itself is what gets saved."""
    train_model = model.compile_decoder() if cfg.compile else model  # the splice stays eager: no graph breaks
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
    extra: torch.Tensor  # the extra loss's metric (e.g. attention on target), summed over micro-batches
    samples: int = 0
    micro_batches: int = 0  # those that had an extra loss term

    @classmethod
    def on(cls, device) -> "Meter":
        return cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long),
                   torch.zeros((), device=device, dtype=torch.bool), torch.zeros((), device=device))

    def reset(self):
        self.loss.zero_()
        self.tokens.zero_()
        self.extra.zero_()
        self.samples = self.micro_batches = 0


def train_step(cfg: TrainConfig, env: Setup, train_model, model, optimizer, scaler, batches, meter: Meter,
               extra=None):
    """One optimizer step over --grad-accum micro-batches. extra: the data source's extra loss term, or None."""
    for micro in range(cfg.grad_accum):
        batch = {k: v.to(env.device, non_blocking=True) for k, v in next(batches).items()}
        # No attention_mask: padding is on the right, so causal attention alone keeps real tokens
        # from seeing it, and padded positions carry label -100. This keeps the fused causal kernel.
        sync = micro == cfg.grad_accum - 1 or env.world == 1
        ctx = contextlib.nullcontext() if sync else train_model.no_sync()
        with ctx, autocast(env.device, env.dtype):
            # With --features the batch holds the tower's cached output instead of pixel_values.
            out = train_model(batch["input_ids"], batch.get("pixel_values"), labels=batch["labels"],
                              image_counts=batch["image_counts"], image_features=batch.get("image_features"),
                              return_logits=False, labelled_last_block=cfg.labelled_last_block)
            loss = out.loss
            if extra is not None and (term := extra(batch)) is not None:
                loss = loss + term[0]
                meter.extra += term[1].detach()
                meter.micro_batches += 1
            loss = loss / cfg.grad_accum
        scaler.scale(loss).backward()
        meter.loss += out.loss.detach() / cfg.grad_accum  # the log shows the language-model loss alone
        meter.nonfinite |= ~torch.isfinite(loss.detach())
        meter.tokens += batch["attention_mask"].sum()
        meter.samples += batch["input_ids"].shape[0] * env.world
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def log_step(env: Setup, paths: Paths, meter: Meter, progress: Progress, epoch, step, steps_logged, dt, lr,
             extra=None):
    """Print one line and append the same numbers to the CSV."""
    eta, mean_loss = progress.eta(step), meter.loss.item() / steps_logged
    metric = round(meter.extra.item() / meter.micro_batches, 3) if meter.micro_batches else ""
    row = dict(epoch=epoch + 1, step=step, steps=steps_logged, total_steps=progress.total, loss=round(mean_loss, 4),
               lr=f"{lr:.3g}", samples_per_s=round(meter.samples / dt, 1),
               tokens_per_s=round(meter.tokens.item() * env.world / dt, 1), elapsed_s=round(progress.elapsed(), 1),
               eta_s=round(eta, 1), peak_mem_mb=round(peak_memory_mb(env.device), 1), attn_on_target=metric)
    print0(f"epoch {row['epoch']} step {step}/{progress.total} loss {mean_loss:.4f} lr {row['lr']} "
           f"{row['samples_per_s']:.1f} samples/s {row['tokens_per_s']:.0f} tok/s "
           f"elapsed {fmt_time(progress.elapsed())} ETA {fmt_time(eta)} peak {row['peak_mem_mb']:.0f} MB"
           + (f" {extra.name} {metric:.2f}" if meter.micro_batches else ""))
    if env.rank == 0:
        append_log(paths.csv, row)
    meter.reset()


# ---------------------------------------------------------------------------------------------
# The run


def main(stage: str, argv=None) -> int:
    """Run one stage; a user's mistake (a bad flag, a missing file, changed flags on --resume, bad data,
    weights or images) ends the run with a one-line error and exit code 2; a bug keeps its traceback."""
    try:
        cfg = parse(stage, argv)
    except SystemExit as e:  # argparse has printed the usage and the error (or --help)
        return e.code
    except UserError as e:
        print0(f"error: {one_line(e)}")
        return 2
    try:
        return run(cfg)
    except (UserError, DataError, WeightsError, ImageLoadError) as e:
        print0(f"error: {one_line(e)}")  # also when raised in a DataLoader worker
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without a new resume point
        print0("interrupted; the last saved resume point is kept")
        return 130
    return 2


def check_inputs(cfg: TrainConfig):
    """The files the run needs exist and the output folder is writable, before anything is built."""
    if not os.path.isfile(cfg.tokenizer) and not os.path.isfile(os.path.join(cfg.tokenizer, "tokenizer.json")):
        raise UserError(f"{cfg.tokenizer}: tokenizer not found (pass --tokenizer; "
                        f"`python -m minivlm.tokenizer train` makes one)")
    for path in [] if cfg.synthetic else cfg.data:
        if not os.path.exists(path):
            raise UserError(f"--data {path}: no such file")
        if os.path.isdir(path):
            raise UserError(f"--data {path}: is a folder; --data takes a .jsonl or .parquet file "
                            f"(and --images the image folder)")
    check_out(cfg.out)


def load_tokenizer(path) -> Tokenizer:
    try:
        return Tokenizer.from_file(path)
    except (ValueError, OSError) as e:  # not JSON, not a tokenizer, unreadable
        raise UserError(f"{path}: not a usable tokenizer ({one_line(e)})") from None


def run(cfg: TrainConfig) -> int:
    env = setup(cfg)
    check_inputs(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    model = build_model(cfg, tokenizer)
    set_trainable(model, cfg.stage, cfg.train_lm_layers, cfg.train_vision)
    model.to(env.device)
    source = data_source(cfg, tokenizer, model.vlm_config, env)
    dataset = source.dataset
    sampler, loader, steps_per_epoch, total_steps = build_loader(cfg, dataset, source.collate(tokenizer.pad_id), env)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.vision_lr, fused=env.device.type == "cuda")
    scaler = grad_scaler(env.device, env.dtype)
    train_model = wrap_model(cfg, model, env)
    extra = source.extra_loss(model, cfg)

    paths = Paths.of(cfg.out, cfg.stage, model.vlm_config)
    step = 0
    if cfg.resume:
        step = restore(paths.resume, cfg, env.world, model, optimizer, scaler)
        print0(f"resumed from {paths.resume} at step {step}/{total_steps}")
    if env.rank == 0:
        prepare_out(cfg, paths, step)
    print0(f"{cfg.stage}: preset {cfg.preset}, {len(dataset)} samples, {env.world} process(es), device "
           f"{env.device}, dtype {env.dtype}, {total_steps} steps of {cfg.batch_size * cfg.grad_accum * env.world} "
           f"samples")
    print0("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in trainable_counts(model).items()))

    sv = Saver(cfg.stage, cfg, paths, env.world, question_first(dataset), tokenizer.vocab_size)
    with StopRequest() as stop:
        code = train_loop(cfg, env, sv, (train_model, model, optimizer, scaler, extra), (sampler, loader),
                          steps_per_epoch, total_steps, step, stop)
    if code == 0 and (line := data_summary(dataset)):  # None for synthetic data; under torchrun, rank 0's
        print0(f"data: {line}")
    if env.world > 1:
        dist.barrier()  # rank 0 may still be writing the last save: tear down together, not mid-write
        del train_model  # DDP freed after its process group aborts the process (about one run in four)
        gc.collect()
        dist.destroy_process_group()
    return code


def stop_after() -> int | None:
    """MINIVLM_STOP_AFTER=k ends the run after step k as if it had been killed there (tests of --resume)."""
    value = os.environ.get("MINIVLM_STOP_AFTER")
    return int(value) if value else None


def train_loop(cfg: TrainConfig, env: Setup, sv: Saver, training, data, steps_per_epoch, total_steps, step,
               stop) -> int:
    """Steps from `step` to `total_steps`; 0 when done, 1 on a non-finite loss, 128 + signal number
    when Ctrl-C / SIGTERM stopped it (after saving a resume point)."""
    train_model, model, optimizer, scaler, extra = training
    sampler, loader = data
    model.train()
    progress, meter, last = Progress(total_steps, cfg.stage, start=step), Meter.on(env.device), stop_after()
    t_log, last_log_step, batches = progress.t0, step, None
    while step < total_steps:
        epoch, k = divmod(step, steps_per_epoch)
        if batches is None or k == 0:
            if batches is not None and (line := data_summary(loader.dataset)):
                print0(f"epoch {epoch} data: {line}")  # the epoch that just ended
            sampler.set_epoch(epoch, start=k * cfg.batch_size * cfg.grad_accum)
            loader.generator.manual_seed(cfg.seed + epoch)  # worker seeds: the same after a resume
            batches = iter(loader)
        factor = lr_factor(step, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        set_lr(optimizer, factor)
        train_step(cfg, env, train_model, model, optimizer, scaler, batches, meter, extra)
        step += 1

        at_log = step % cfg.log_every == 0 or step == total_steps
        at_save = step % cfg.save_every == 0 or step == total_steps
        if (at_log or at_save) and bool(meter.nonfinite):
            print0(f"error: the loss became non-finite before step {step} (lr {cfg.lr}, dtype {env.dtype}); "
                   f"stopping. The last good checkpoint {sv.paths.ckpt} was not overwritten. Try a lower --lr, "
                   f"--dtype bf16 instead of fp16, or a smaller --grad-clip.")
            return 1
        if at_log:
            now = time.time()
            log_step(env, sv.paths, meter, progress, epoch, step, step - last_log_step, now - t_log,
                     cfg.lr * factor, extra)
            t_log, last_log_step = now, step
        stopping = step < total_steps and stop_requested(stop, env.world, env.device)
        if at_save or stopping:  # every process: save() gathers their RNG states
            save(sv, model, optimizer, scaler, step, final=step == total_steps)
        if stopping:
            print0(f"stopped by {stop.name} after step {step}/{total_steps}; resume point saved in "
                   f"{sv.paths.resume}: run the same command with --resume to continue")
            return 128 + stop.signum
        if last is not None and step >= last:
            print0(f"stopping after step {step} (MINIVLM_STOP_AFTER)")
            break
    return 0
