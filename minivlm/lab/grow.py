"""Make a trained decoder deeper without changing what it computes, then keep training it.

    python -m minivlm.grow --weights minivlm/demo/model/sft_vlm_128.pth --out out/s8 --add-layers 2

New decoder blocks are inserted (by default after the last one) with their two output projections,
`self_attn.o_proj` and `mlp.down_proj` (every expert's, with MoE), set to zero. A block adds its
attention and MLP outputs to the residual stream, so a block whose outputs are zero passes the stream
through untouched: the grown model gives exactly the logits of the original. Training then starts from
there, and the gradient reaches the zeroed projections at once (their inputs are not zero), so the new
blocks come to life from the first step.

Why: the demo's 4-layer decoder could not learn "Where is the <shape>?" about several objects in any
budget we tried; grown by two blocks it did (docs/demo_history.md). The rest of the file (the
embeddings, the projector, the vision tower saved beside it, the tokenizer) is carried over as is.
"""

from __future__ import annotations

# "Net2Net: Accelerating Learning via Knowledge Transfer", Chen, Goodfellow & Shlens 2016
# (function-preserving growth; here the identity block of a pre-norm residual network).

import argparse
import copy
import os
import sys

import torch

from ..model.checkpoint import load_vlm, read_meta, save_vlm, tokenizer_beside
from ..common import UserError, atomic_copy, one_line, positive_int, write_error
from ..model.vlm import MiniMindVLM
from ..model.weights import WeightsError


def grow_decoder(model: MiniMindVLM, add_layers: int, at: int | None = None) -> MiniMindVLM:
    """A new MiniMindVLM with `add_layers` identity blocks inserted before block `at` (default: after the
    last). It shares the vision tower with `model`; every other tensor is a copy."""
    old = model.vlm_config.lm.num_hidden_layers
    at = old if at is None else at
    if add_layers < 1:
        raise ValueError(f"add_layers must be at least 1, got {add_layers}")
    if not 0 <= at <= old:
        raise ValueError(f"at must be between 0 and {old} (the decoder has {old} blocks), got {at}")
    cfg = copy.deepcopy(model.vlm_config)
    cfg.lm.num_hidden_layers = old + add_layers
    grown = MiniMindVLM(cfg, vision_model=model.vision_encoder)
    grown.to(next(model.parameters()).dtype)
    # Old block i keeps its index below `at` and moves up by add_layers from there.
    new_index = {i: i if i < at else i + add_layers for i in range(old)}
    state = {}
    for name, tensor in model.lm_state_dict().items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            name = name.replace(f"model.layers.{i}.", f"model.layers.{new_index[i]}.", 1)
        state[name] = tensor.detach().clone()
    for j in range(at, at + add_layers):  # the new blocks: random like any fresh block, outputs zeroed
        for name, tensor in grown.model.layers[j].state_dict().items():
            zero = name == "self_attn.o_proj.weight" or name.endswith("down_proj.weight")
            state[f"model.layers.{j}.{name}"] = torch.zeros_like(tensor) if zero else tensor.clone()
    if cfg.lm.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embeddings; re-tied by the model
    missing, unexpected = grown.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("vision_encoder.") or k == "lm_head.weight" for k in missing), \
        (missing, unexpected)
    return grown


def check_out(out, weights):
    """--out may not be the folder of --weights: the grown checkpoint has the same file name and would
    replace the one it grows (and its vision tower) in place."""
    here = os.path.dirname(os.path.abspath(weights))
    if os.path.isdir(out) and os.path.samefile(out, here):
        raise UserError(f"--out {out}: is the folder of --weights {weights}; the grown checkpoint would replace "
                        f"it: choose another folder")


def write_grown(grown: MiniMindVLM, path, meta: dict, tokenizer):
    """The grown checkpoint, its vision tower (when one travels with the original; it is the tower the
    original was loaded with, saved again by save_vlm as part of the unit) and a copy of the tokenizer."""
    out = os.path.dirname(os.path.abspath(path))
    os.makedirs(out, exist_ok=True)
    if os.path.isfile(tokenizer):
        atomic_copy(tokenizer, os.path.join(out, "tokenizer.json"))
    vision_folder = None
    if "vision_folder" in meta:
        vision_folder = os.path.join(out, os.path.basename(os.path.normpath(meta["vision_folder"])))
    save_vlm(grown, path, dtype=torch.float32, vision_folder=vision_folder,
             question_first=bool(meta.get("question_first", False)),
             tokenizer_vocab_size=meta.get("tokenizer_vocab_size"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minivlm.grow", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--weights", required=True, help="the checkpoint to grow (.pth with its .json beside it)")
    ap.add_argument("--out", required=True,
                    help="output folder: gets the grown checkpoint (same file name), its tokenizer.json and "
                         "its vision tower, ready for train_sft.py --init/--tokenizer")
    ap.add_argument("--add-layers", type=positive_int, default=2, help="how many decoder blocks to add")
    ap.add_argument("--at", type=int, default=None,
                    help="insert the new blocks before this block index (default: after the last block)")
    args = ap.parse_args(argv)
    try:
        if not os.path.isfile(args.weights):
            raise UserError(f"--weights {args.weights}: no such file")
        model = load_vlm(args.weights)
        meta = read_meta(args.weights)
        old = model.vlm_config.lm.num_hidden_layers
        at = old if args.at is None else args.at
        if not 0 <= at <= old:
            raise UserError(f"--at {at}: the decoder of {args.weights} has {old} blocks, so --at must be 0..{old}")
        check_out(args.out, args.weights)
    except (UserError, WeightsError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    grown = grow_decoder(model, args.add_layers, at)
    path = os.path.join(args.out, os.path.basename(args.weights))
    try:
        write_grown(grown, path, meta, tokenizer_beside(args.weights))
    except OSError as e:  # a full disk, no permission: what save_vlm wrote is all or nothing
        print(f"error: cannot write {write_error(e, args.out)}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {old} -> {old + args.add_layers} decoder blocks (new: {at}..{at + args.add_layers - 1}, "
          f"identity at start), {sum(p.numel() for p in grown.lm_state_dict().values()):,} parameters without "
          f"the vision tower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
