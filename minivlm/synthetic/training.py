"""The one hook that plugs the shapes world into the training loop (`--data synthetic`).

The loop in `minivlm/train/loop.py` asks its data source for three things: a dataset, a collate function,
and, optionally, an extra loss term. A folder of jsonl or parquet files gives the first two. The shapes world
gives all three: scenes rendered on the fly, batches that also carry where each answer should look, and the
attention-supervision loss (`attention.py`). It also owns its flags, which the training command line adds
only when `--data synthetic` is asked for:

    add_flags(parser, stage)            the world's flags (questions per image, question-type odds, --attn-sup)
    options(args, stage, preset)        -> their values as a plain dict, recipe defaults filled in and checked
    ShapesTraining(stage, cfg, ...)     the data source: .dataset, .collate, .extra_loss(model, cfg)
"""

from __future__ import annotations

import argparse
import functools
import math

from torch.utils.data import ConcatDataset

from ..common import UserError, positive_int, print0
from ..data.dataset import collate_vlm
from .attention import AttentionTap, collate_looks, look_loss
from .dataset import SyntheticVLMDataset
from .world import QTYPES

# Per stage and preset family: the tiny recipe asks four questions per image, one sample in five about two
# images, and supervises one head's attention; other presets keep one question and no supervision.
DEFAULTS = {
    ("pretrain", "real"): dict(questions_per_image=1, multi_fraction=0.125, qtype_weights=""),
    ("sft", "real"): dict(questions_per_image=1, multi_fraction=0.125, attn_sup=0.0, qtype_weights=""),
    ("pretrain", "tiny"): dict(questions_per_image=1, multi_fraction=0.125, qtype_weights=""),
    # "Where is the X?" about two or three objects is the hardest type to learn: the tiny recipe asks it twice
    # as often as each other type; "diff" learns fast, so one sample in ten is about two images.
    ("sft", "tiny"): dict(questions_per_image=4, multi_fraction=0.1, attn_sup=1.0, qtype_weights="position=2.0"),
}
LOOKUP_TYPES = [t for t in QTYPES if t not in ("describe", "diff")]  # the types --qtype-weights may weigh


def parse_qtype_weights(text: str) -> dict:
    """'colour=2,exists=1.5' -> {"colour": 2.0, "exists": 1.5}."""
    weights = {}
    for item in filter(None, text.split(",")):
        name, _, value = (s.strip() for s in item.partition("="))
        if name not in LOOKUP_TYPES:
            raise argparse.ArgumentTypeError(f"unknown question type {name!r} (choose from {', '.join(LOOKUP_TYPES)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected TYPE=NUMBER") from None
        if not math.isfinite(weights[name]) or weights[name] < 0:
            raise argparse.ArgumentTypeError(f"{item!r}: a weight must be a finite number >= 0")
    return weights


def qtype_weights(text: str) -> str:
    """argparse type: the weights, checked and in a canonical order, as a string (the resume state records it)."""
    return ",".join(f"{k}={v}" for k, v in sorted(parse_qtype_weights(text).items()))


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text}: expected a fraction from 0 to 1")
    return value


def weight(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text}: a weight must be a finite number >= 0 (0 = off)")
    return value


def add_flags(parser: argparse.ArgumentParser, stage: str):
    g = parser.add_argument_group("the synthetic shapes world (--data synthetic)").add_argument
    g("--synthetic-samples", type=positive_int, default=1_000_000, help="samples per epoch")
    g("--describe-weight", type=weight, default=0.2,
      help="(SFT) odds of a 'describe' question relative to each other question type")
    g("--qtype-weights", type=qtype_weights, default=None, metavar="TYPE=W,...",
      help="(SFT) odds of other question types relative to the rest (unnamed types 1), e.g. "
           "colour=2,exists=2,count=0.5 (describe: --describe-weight; default: tiny position=2, else all 1)")
    g("--multi-fraction", type=fraction, default=None,
      help="(SFT) the share of samples that ask about two images (0 = none; default: tiny 0.1, else 0.125)")
    g("--questions-per-image", type=positive_int, default=None,
      help="(SFT) questions about one image in one conversation, each answer trained "
           "(more supervision per image forward; default: tiny 4, else 1)")
    if stage == "sft":
        g("--attn-sup", type=weight, default=None, metavar="WEIGHT",
          help="attention supervision: add WEIGHT x (minus the log of the attention that one head pays to the "
               "object each question is about) to the loss, at every position that predicts an answer token; "
               "0 = off (default: tiny 1, else 0; see minivlm/synthetic/attention.py)")
        g("--attn-sup-layer", type=int, default=1, help="with --attn-sup: the decoder layer (0-based) of the supervised head")
        g("--attn-sup-head", type=int, default=0, help="with --attn-sup: the supervised query head of that layer")


def options(args, stage: str, preset: str) -> dict:
    """The world's flags from parsed args, unset ones filled from DEFAULTS."""
    names = ["synthetic_samples", "describe_weight", "qtype_weights", "multi_fraction", "questions_per_image"]
    names += ["attn_sup", "attn_sup_layer", "attn_sup_head"] if stage == "sft" else []
    out = {k: getattr(args, k) for k in names}
    for k, v in DEFAULTS[(stage, "tiny" if preset == "tiny" else "real")].items():
        if out[k] is None:
            out[k] = v
    return out


def collate_with_looks(batch, pad_id=0):
    """collate_vlm, plus look_rows (R, 2) and look_keys (R, T) when the samples say where to look."""
    out = collate_vlm(batch, pad_id)
    if "look_rows" in batch[0]:
        out["look_rows"], out["look_keys"] = collate_looks(batch, out["input_ids"].shape[1])
    return out


class LookLoss:
    """The extra loss term of attention supervision: weight x look_loss on one head, when the batch has rows."""
    name, column = "attention on target", "attn_on_target"  # the log line's words and the CSV column

    def __init__(self, tap: AttentionTap, weight: float, head: int):
        self.tap, self.weight, self.head = tap, weight, head

    def __call__(self, batch):
        if not len(batch["look_rows"]):
            return None
        loss, on_target = look_loss(self.tap, batch["look_rows"], batch["look_keys"], self.head)
        return self.weight * loss, on_target


class ShapesTraining:
    """The shapes world as the training loop's data source."""

    def __init__(self, stage: str, cfg, tokenizer, vlm_cfg):
        self.options = o = cfg.shapes
        look = o.get("attn_sup", 0) > 0  # each sample also says where its answers' attention should go
        make = lambda kind, n, **kw: SyntheticVLMDataset(kind, n, cfg.seed, tokenizer, vlm_cfg.run_length,
                                                         cfg.max_length, image_size=vlm_cfg.vision.image_size,
                                                         look=look, **kw)
        n = o["synthetic_samples"]
        if stage == "pretrain":
            self.dataset = make("pretrain", n)
        else:
            n_multi = int(n * o["multi_fraction"])  # this share asks about two images
            weights = {**parse_qtype_weights(o["qtype_weights"]), "describe": o["describe_weight"]}
            sft = make("sft", n - n_multi, qtype_weights=weights, questions_per_image=o["questions_per_image"])
            self.dataset = ConcatDataset([sft, make("multi", n_multi)])

    def collate(self, pad_id: int):
        return functools.partial(collate_with_looks, pad_id=pad_id)

    def extra_loss(self, model, cfg):
        """--attn-sup: a LookLoss on the supervised head (checked against the model), else None."""
        w, layer, head = (self.options.get(k, 0) for k in ("attn_sup", "attn_sup_layer", "attn_sup_head"))
        if not w:
            return None
        lm = model.config
        if not 0 <= layer < lm.num_hidden_layers:
            raise UserError(f"--attn-sup-layer {layer}: the decoder has layers 0..{lm.num_hidden_layers - 1}")
        if not 0 <= head < lm.num_attention_heads:
            raise UserError(f"--attn-sup-head {head}: the layer has heads 0..{lm.num_attention_heads - 1}")
        if cfg.compile:
            raise UserError("--attn-sup does not combine with --compile (its hook would sit inside the compiled graph)")
        print0(f"attention supervision: head {head} of layer {layer}, weight {w}")
        return LookLoss(AttentionTap(model.model.layers[layer].self_attn), w, head)
