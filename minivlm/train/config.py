"""What a training run is asked to do: `TrainConfig`, built once from the command line of
`train_pretrain.py` / `train_sft.py`, filled from the recipe of its preset, checked, then passed down.

A flag left unset takes the recipe's value. "real" is MiniMind-V's recipe for its models on its data;
"tiny" is the CPU recipe that trains a working VLM on the synthetic shapes world in minutes (it trains
the vision tower too, since no pretrained CLIP is available offline). With `--data synthetic` the shapes
world adds its own flags (`minivlm/synthetic/training.py`); plain training never loads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

from ..common import UserError, positive_int

# Defaults per (stage, preset family). "real": MiniMind-V's published recipe (AdamW, lr 4e-4 for the
# projector in pretraining, ~2e-5 in SFT, batch 16, max length 640 / 1536). "tiny": the offline CPU recipe.
RECIPES = {
    ("pretrain", "real"): dict(lr=4e-4, batch_size=16, epochs=4, max_length=640, train_lm_layers=0,
                               warmup_steps=0, train_vision=False),
    ("sft", "real"): dict(lr=2e-5, batch_size=16, epochs=2, max_length=1536, train_lm_layers=-1,
                          warmup_steps=0, train_vision=False),
    ("pretrain", "tiny"): dict(lr=2e-3, batch_size=32, epochs=1, max_length=128, train_lm_layers=-1,
                               warmup_steps=100, train_vision=True, vision_lr=5e-4, data=["synthetic"],
                               max_steps=1200, labelled_last_block=False),
    # minimind-3v (MiniMind-V's 2026 trainer): pretrain 2 epochs of 16 at 4e-4, 450 tokens, projector only;
    # SFT 2 epochs of 4 at 5e-6, 768 tokens (MiniMind-V unfreezes the first and last block; minivlm all).
    ("pretrain", "3v"): dict(lr=4e-4, batch_size=16, epochs=2, max_length=450, train_lm_layers=0,
                             warmup_steps=0, train_vision=False),
    ("sft", "3v"): dict(lr=5e-6, batch_size=4, epochs=2, max_length=768, train_lm_layers=-1,
                        warmup_steps=0, train_vision=False),
    ("sft", "tiny"): dict(lr=1e-3, batch_size=32, epochs=1, max_length=160, train_lm_layers=-1,
                          warmup_steps=50, train_vision=True, vision_lr=3e-4, data=["synthetic"],
                          max_steps=7000, labelled_last_block=False),
}
PRESETS = ("26m", "104m", "26m-moe", "tiny", "3v", "3v-moe")


def recipe_of(preset: str) -> str:
    """Which RECIPES row a preset trains with: the offline shapes recipe, minimind-3v's, or MiniMind-V's."""
    return "tiny" if preset == "tiny" else "3v" if preset.startswith("3v") else "real"


@dataclass
class TrainConfig:
    """One training run. Every field is a flag of the same name (`--batch-size` -> batch_size)."""
    stage: str  # "pretrain" | "sft"
    preset: str = "26m"
    data: list = field(default_factory=list)  # .jsonl / .parquet paths, or ["synthetic"]
    images: str | None = None
    tokenizer: str | None = None
    vision: str | None = None
    out: str = "out"
    from_lm: str | None = None  # pretrain only
    untied_embeddings: bool = False  # pretrain only
    init: str | None = None  # sft only
    train_lm_layers: int = 0
    train_vision: bool = False
    features: str | None = None
    feature_cache: str = "auto"
    group_by_length: bool | None = None  # None: on for --data files, off for the shapes world
    labelled_last_block: bool = True
    lr: float = 4e-4
    vision_lr: float | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_length: int = 640
    dropout: float | None = None
    skip_bad: bool = False
    dtype: str = "auto"
    device: str | None = None
    compile: bool = False
    num_workers: int | None = None
    threads: int | None = None
    seed: int = 0
    log_every: int = 20
    save_every: int = 500
    resume: bool = False
    # The shapes world's own options (--data synthetic only), kept as plain data so that this module
    # never imports the world; minivlm/synthetic/training.py defines, fills and checks them.
    shapes: dict = field(default_factory=dict)

    @property
    def synthetic(self) -> bool:
        return self.data == ["synthetic"]

    def record(self) -> dict:
        """The flags as one flat dict of plain values: what the resume state stores and compares."""
        flat = {k: v for k, v in dataclasses.asdict(self).items() if k != "shapes"}
        return {**flat, **self.shapes}

    def check(self):
        """Ranges that argparse's types cannot say; a UserError names the flag."""
        def need(ok, flag, value, what):
            if not ok:
                raise UserError(f"--{flag} {value}: {what}")
        finite = lambda x: x is not None and math.isfinite(x)
        need(finite(self.lr) and self.lr > 0, "lr", self.lr, "expected a positive number")
        need(finite(self.vision_lr) and self.vision_lr >= 0, "vision-lr", self.vision_lr,
             "expected a number >= 0")
        need(finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min-lr-ratio", self.min_lr_ratio,
             "expected a fraction from 0 to 1")
        need(finite(self.weight_decay) and self.weight_decay >= 0, "weight-decay", self.weight_decay,
             "expected a number >= 0")
        need(finite(self.grad_clip) and self.grad_clip >= 0, "grad-clip", self.grad_clip, "expected >= 0 (0 = off)")
        need(self.warmup_steps >= 0, "warmup-steps", self.warmup_steps, "expected an integer >= 0")
        need(self.max_length >= 1, "max-length", self.max_length, "expected an integer >= 1")
        need(self.dropout is None or (finite(self.dropout) and 0 <= self.dropout < 1), "dropout", self.dropout,
             "expected a probability from 0 to below 1")
        need(self.num_workers is None or self.num_workers >= 0, "num-workers", self.num_workers,
             "expected an integer >= 0")
        need(self.threads is None or self.threads >= 1, "threads", self.threads, "expected an integer >= 1")
        need(self.train_lm_layers >= -1, "train-lm-layers", self.train_lm_layers,
             "expected -1 (all), 0 (none) or a number of layers")
        if not self.data:
            raise UserError(f"--data is required for preset {self.preset} (a MiniMind-V jsonl or parquet file)")
        if "synthetic" in self.data and len(self.data) > 1:
            raise UserError("--data synthetic cannot be mixed with files")
        if self.synthetic and self.features:
            raise UserError("--features works with --data files, not synthetic data (made on the fly)")


def add_flags(p: argparse.ArgumentParser, stage: str):
    """The flags of every run; a flag left at None takes the preset's recipe value."""
    a = p.add_argument
    a("--preset", default="26m", choices=PRESETS,
      help="model: 26m/104m/26m-moe (MiniMind-V: CLIP, '@' x 196), 3v/3v-moe (minimind-3v: SigLIP2 --vision "
           "folder, a 3v tokenizer, <|image_pad|> x 64), tiny (the offline shapes model)")
    a("--data", default=None, nargs="+", metavar="FILE",
      help="MiniMind-V data: .jsonl files (images in --images) and/or .parquet files (pretrain_i2t.parquet, "
           "sft_i2t.parquet: images inside), or 'synthetic' to render shapes scenes on the fly")
    a("--images", default=None, help="image folder of --data (default: the jsonl's folder)")
    a("--tokenizer", default=None, help="tokenizer.json or a folder holding it (default: --out/tokenizer.json)")
    a("--vision", default=None, help="Hugging Face tower folder: CLIP (e.g. clip-vit-base-patch16), or SigLIP2 "
                                     "for --preset 3v; without it the tower starts random, which only makes "
                                     "sense with --train-vision")
    a("--out", default="out", help="output folder for checkpoints, logs and the resume state")
    if stage == "pretrain":
        a("--from-lm", default=None, help="initialise the decoder from a MiniMind LM .pth (else random)")
        a("--untied-embeddings", action="store_true",
          help="a fresh decoder whose lm_head is not its embedding matrix, embeddings at unit scale "
               "(LMConfig.tie_word_embeddings=False)")
    else:
        a("--init", default=None, help="checkpoint to start from (default: the pretrain output in --out)")
    a("--train-lm-layers", type=int, default=None,
      help="also train the last K decoder layers (0 = projector only; -1 = the whole decoder)")
    a("--train-vision", action=argparse.BooleanOptionalAction, default=None,
      help="train the vision tower too (the tiny recipe does: it has no pretrained CLIP)")
    a("--features", default=None, metavar="DIR",
      help="a store of the frozen tower's output (python -m minivlm.features): images are neither decoded nor encoded")
    a("--feature-cache", default="auto", choices=["auto", "off"],
      help="auto: with a frozen CLIP tower (--vision, no --train-vision) and --epochs > 1, compute its output "
           "once, before the first step, into OUT/feature_cache/ (fp32: the same weights as without it; reused "
           "while data, images and tower are unchanged; skipped when it would fill half the free disk); "
           "off: run the tower on every step")
    a("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
      help="batches of samples of similar length (less padding; LLaVA's group_by_modality_length idea): "
           "the shuffled order is cut into chunks (64 batches, or a parquet file's row groups), each sorted by "
           "length, its batches shuffled (default: on with --data files; the shapes world has no lengths)")


def add_optimisation_flags(p: argparse.ArgumentParser):
    """How long, how big and how fast: the step budget, the batch and the optimiser."""
    a = p.add_argument
    a("--vision-lr", type=float, default=None, help="learning rate of the vision tower (default: --lr)")
    a("--epochs", type=positive_int, default=None, help="passes over the data")
    a("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps (budget in steps)")
    a("--batch-size", type=positive_int, default=None, help="samples per micro-batch per process")
    a("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, default=None, help="peak learning rate")
    a("--warmup-steps", type=int, default=None, help="linear warm-up steps before the cosine decay")
    a("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to lr * this")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay (never on norms and biases)")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    a("--max-length", type=int, default=None,
      help="tokens per sample; a longer one is cut before the first image run that does not fit (that image "
           "and all after it dropped), or skipped and counted when no answer token would be left")
    a("--dropout", type=float, default=None,
      help="dropout in the decoder while training (default: the preset's, 0; SFT: the initial checkpoint's)")
    a("--skip-bad", action="store_true",
      help="skip (and count) bad samples instead of stopping at the first; samples with no answer token "
           "left within --max-length are always skipped and counted")


def add_run_flags(p: argparse.ArgumentParser):
    """Where and how the run computes, logs and saves."""
    a = p.add_argument
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="compute dtype (autocast); auto = bf16 on a GPU that supports it, else fp32")
    a("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    a("--compile", action="store_true", help="torch.compile the decoder as one graph (the splice stays eager)")
    a("--labelled-last-block", action=argparse.BooleanOptionalAction, default=None,
      help="the last decoder block makes its queries and MLP only where a label waits (same loss and "
           "gradients up to float rounding; 7-15%% faster steps on 26m; dense decoders). Default: on, "
           "but off in the tiny recipe, whose shipped demo model was trained before it existed and is "
           "reproduced bit for bit")
    a("--num-workers", type=int, default=None, help="DataLoader worker processes (default: min(4, cpus-1))")
    a("--threads", type=int, default=None,
      help="torch CPU threads (default: torch's choice); 1 is much faster on a CPU shared with other jobs")
    a("--seed", type=int, default=0, help="seed of initialisation, shuffling and synthetic data")
    a("--log-every", type=positive_int, default=20, help="log every N optimizer steps")
    a("--save-every", type=positive_int, default=500, help="save a checkpoint every N optimizer steps (and at the end)")
    a("--resume", action="store_true", help="continue from --out's resume state, exactly")


def build_parser(stage: str, add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"train_{stage}.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter, add_help=add_help,
        description=("Stage 1: caption pretraining (projector trained; CLIP frozen unless --train-vision)."
                     if stage == "pretrain" else
                     "Stage 2: instruction tuning (projector + whole decoder trained; CLIP frozen unless "
                     "--train-vision).")
        + " Flags left at None take the recipe default of --preset (26m/104m/26m-moe: MiniMind-V's "
          "recipe on real data; tiny: the offline CPU recipe on the synthetic world).",
        epilog="With --data synthetic (the default of --preset tiny) the shapes world adds its own flags: "
               f"see `python train_{stage}.py --preset tiny --help`.")
    add_flags(p, stage)
    add_optimisation_flags(p)
    add_run_flags(p)
    return p


def parse(stage: str, argv=None) -> TrainConfig:
    """The command line -> a checked TrainConfig (argparse errors exit with status 2, as usual)."""
    known, _ = build_parser(stage, add_help=False).parse_known_args(argv)
    recipe = RECIPES[(stage, recipe_of(known.preset))]
    parser = build_parser(stage)
    world = None
    if (known.data or recipe.get("data")) == ["synthetic"]:
        # The shapes world brings its own flags; importing it here, only for its data, keeps plain training
        # free of it.
        from ..synthetic import training as world
        world.add_flags(parser, stage)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}"
                     + ("" if world else " (the shapes world's flags need --data synthetic)"))
    values = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    for k, v in recipe.items():
        if values.get(k) is None:
            values[k] = v
    values = {k: v for k, v in values.items() if v is not None}  # neither flag nor recipe: the field's default
    cfg = TrainConfig(stage=stage, **values)
    if cfg.vision_lr is None:
        cfg.vision_lr = cfg.lr
    if cfg.tokenizer is None:
        cfg.tokenizer = os.path.join(cfg.out, "tokenizer.json")
    cfg.check()
    if cfg.group_by_length is None:
        cfg.group_by_length = not cfg.synthetic
    if world:
        cfg.shapes = world.options(args, stage, cfg.preset)
    return cfg
