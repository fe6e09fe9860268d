"""What a training run is asked to do: the command line of `train_pretrain.py` / `train_sft.py` and
the default recipe per stage and preset.

A flag left at None takes the recipe's value. "real" is MiniMind-V's recipe for the 26M model on its
data; "tiny" is the CPU recipe that trains a working VLM on the synthetic shapes world in minutes
(it trains the vision tower too, since no pretrained CLIP is available offline).
"""

from __future__ import annotations

import argparse
import os

from ..common import UserError, positive_int

# Defaults per (stage, preset family). "real": MiniMind-V's published recipe (AdamW, lr 4e-4 for the
# projector in pretraining, ~2e-5 in SFT, batch 16, max length 640 / 1536). "tiny": the offline CPU recipe.
RECIPES = {
    ("pretrain", "real"): dict(lr=4e-4, batch_size=16, epochs=4, max_length=640, train_lm_layers=0,
                               warmup_steps=0, train_vision=False, questions_per_image=1, multi_fraction=0.125),
    ("sft", "real"): dict(lr=2e-5, batch_size=16, epochs=2, max_length=1536, train_lm_layers=-1,
                          warmup_steps=0, train_vision=False, questions_per_image=1, multi_fraction=0.125),
    ("pretrain", "tiny"): dict(lr=2e-3, batch_size=32, epochs=1, max_length=128, train_lm_layers=-1,
                               warmup_steps=100, train_vision=True, vision_lr=5e-4, data="synthetic",
                               max_steps=1200, synthetic_samples=1_000_000, questions_per_image=1,
                               multi_fraction=0.125),
    ("sft", "tiny"): dict(lr=1e-3, batch_size=32, epochs=1, max_length=160, train_lm_layers=-1,
                          warmup_steps=50, train_vision=True, vision_lr=3e-4, data="synthetic",
                          max_steps=3500, synthetic_samples=1_000_000, questions_per_image=4,
                          multi_fraction=0.2),
}


def qtype_weights(text: str) -> str:
    """argparse type: 'exists=1.5,colour=2' -> 'colour=2.0,exists=1.5' (checked, in a canonical order, and a
    string, so that the resume state records it); parse_qtype_weights turns it into a dict."""
    return ",".join(f"{k}={v}" for k, v in sorted(parse_qtype_weights(text).items()))


def parse_qtype_weights(text: str) -> dict:
    """'colour=2,exists=1.5' -> {"colour": 2.0, "exists": 1.5} (the SFT question types but describe)."""
    from ..synthetic.world import QTYPES
    types = [t for t in QTYPES if t not in ("describe", "diff")]
    weights = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name.strip() not in types:
            raise argparse.ArgumentTypeError(f"unknown question type {name.strip()!r} (choose from {', '.join(types)})")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected TYPE=NUMBER") from None
        if weights[name.strip()] < 0:
            raise argparse.ArgumentTypeError(f"{item!r}: a weight cannot be negative")
    return weights


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: expected a fraction from 0 to 1")
    return value


def build_parser(stage: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"train_{stage}.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=("Stage 1: caption pretraining (projector trained; CLIP frozen unless --train-vision)."
                     if stage == "pretrain" else
                     "Stage 2: instruction tuning (projector + whole decoder trained; CLIP frozen unless "
                     "--train-vision).")
        + " Flags left at None take the recipe default of --preset (26m/104m/26m-moe: MiniMind-V's "
          "recipe on real data; tiny: the offline CPU recipe on the synthetic world).")
    a = p.add_argument
    a("--preset", default="26m", choices=["26m", "104m", "26m-moe", "tiny"], help="model size")
    a("--data", default=None, nargs="+", metavar="FILE",
      help="MiniMind-V data: .jsonl files (images in --images) and/or .parquet files (pretrain_i2t.parquet, "
           "sft_i2t.parquet: images inside), or 'synthetic' to render shapes scenes on the fly")
    a("--images", default=None, help="image folder of --data (default: the jsonl's folder)")
    a("--tokenizer", default=None, help="tokenizer.json or a folder holding it (default: --out/tokenizer.json)")
    a("--vision", default=None, help="Hugging Face CLIP folder (e.g. clip-vit-base-patch16); without it the "
                                     "tower starts random, which only makes sense with --train-vision")
    a("--out", default="out", help="output folder for checkpoints, logs and the resume state")
    if stage == "pretrain":
        a("--from-lm", default=None, help="initialise the decoder from a MiniMind LM .pth (else random)")
        a("--untied-embeddings", action="store_true",
          help="a fresh decoder whose lm_head is not its embedding matrix, embeddings at unit scale "
               "(LMConfig.tie_word_embeddings=False; see the README on why the demo could not answer yes/no)")
    else:
        a("--init", default=None, help="checkpoint to start from (default: the pretrain output in --out)")
    a("--train-lm-layers", type=int, default=None,
      help="also train the last K decoder layers (0 = projector only; -1 = the whole decoder)")
    a("--train-vision", action=argparse.BooleanOptionalAction, default=None,
      help="train the vision tower too (the tiny recipe does: it has no pretrained CLIP)")
    a("--features", default=None, metavar="DIR",
      help="a store of the frozen tower's output (python -m minivlm.features): images are neither decoded nor encoded")
    a("--group-by-length", action=argparse.BooleanOptionalAction, default=False,
      help="batches of samples of similar length (less padding; LLaVA's group_by_modality_length idea)")
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
    a("--max-length", type=int, default=None, help="tokens per sample; a longer one is cut before the first image run that does not fit "
                                                     "(that image and all after it dropped), or skipped and counted "
                                                     "when no answer token would be left")
    a("--dropout", type=float, default=None,
      help="dropout in the decoder while training (default: the preset's, 0; SFT: the initial checkpoint's)")
    a("--skip-bad", action="store_true",
      help="skip (and count) bad samples instead of stopping at the first; samples with no answer token "
           "left within --max-length are always skipped and counted")
    a("--synthetic-samples", type=int, default=None, help="with --data synthetic: samples per epoch")
    a("--describe-weight", type=float, default=0.2,
      help="with --data synthetic (SFT): odds of a 'describe' question relative to each other question type")
    a("--qtype-weights", type=qtype_weights, default="", metavar="TYPE=W,...",
      help="with --data synthetic (SFT): odds of other question types relative to the rest (default 1 each), "
           "e.g. colour=2,position=2,exists=2,count=0.5 (describe: --describe-weight)")
    a("--multi-fraction", type=fraction, default=None,
      help="with --data synthetic (SFT): the share of samples that ask about two images (0 = none; default: "
           "the preset's: tiny 0.2, else 0.125)")
    a("--questions-per-image", type=positive_int, default=None,
      help="with --data synthetic (SFT): questions about one image in one conversation, each answer trained "
           "(more supervision per image forward; default: the preset's: tiny 4, else 1)")
    if stage == "sft":
        a("--attn-sup", type=float, default=None, metavar="WEIGHT",
          help="attention supervision (with --data synthetic): add WEIGHT x (minus the log of the attention that "
               "one head pays to the object each question is about) to the loss, at every position that predicts "
               "an answer token; 0 = off (default: the preset's: tiny 1, else 0; see minivlm/attn_supervision.py)")
        a("--attn-sup-layer", type=int, default=1, help="with --attn-sup: the decoder layer (0-based) of the supervised head")
        a("--attn-sup-head", type=int, default=0, help="with --attn-sup: the supervised query head of that layer")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="compute dtype (autocast); auto = bf16 on a GPU that supports it, else fp32")
    a("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    a("--compile", action="store_true", help="torch.compile the decoder as one graph (the splice stays eager)")
    a("--num-workers", type=int, default=None, help="DataLoader worker processes (default: min(4, cpus-1))")
    a("--threads", type=int, default=None,
      help="torch CPU threads (default: torch's choice); 1 is much faster on a CPU shared with other jobs")
    a("--seed", type=int, default=0, help="seed of initialisation, shuffling and synthetic data")
    a("--log-every", type=positive_int, default=20, help="log every N optimizer steps")
    a("--save-every", type=positive_int, default=500, help="save a checkpoint every N optimizer steps (and at the end)")
    a("--resume", action="store_true", help="continue from --out's resume state, exactly")
    a("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill at step k
    return p


def resolve(stage: str, args) -> argparse.Namespace:
    """Fill flags left at None from the recipe of --preset."""
    recipe = RECIPES[(stage, "tiny" if args.preset == "tiny" else "real")]
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    synthetic = args.data in ("synthetic", ["synthetic"])
    if stage == "sft" and args.attn_sup is None:  # only the shapes world knows where each object is
        args.attn_sup = 1.0 if args.preset == "tiny" and synthetic else 0.0
    if getattr(args, "attn_sup", 0) < 0:
        raise UserError(f"--attn-sup {args.attn_sup}: a weight cannot be negative (0 = off)")
    if getattr(args, "attn_sup", 0) and not synthetic:
        raise UserError("--attn-sup needs --data synthetic: only the generated shapes world says where each "
                        "object is (pass --attn-sup 0 for other data)")
    if args.vision_lr is None:
        args.vision_lr = args.lr
    if args.data is None:
        raise UserError(f"--data is required for preset {args.preset} (a MiniMind-V jsonl file)")
    if args.tokenizer is None:
        args.tokenizer = os.path.join(args.out, "tokenizer.json")
    return args
