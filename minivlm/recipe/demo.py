"""`python -m minivlm.recipe --out out/demo`: the shipped demo model, made from nothing by one command.

Every stage is one of the commands "Train your own" teaches, with its flags fixed here, so that the same
command on the same torch version makes the same bytes:

  1. data       python -m minivlm.synthetic --out OUT/data --train 2000 --test 300 --seed 0
  2. tokenizer  python -m minivlm.tokenizer train --data OUT/data/*.jsonl --out OUT
  3. pretrain   python train_pretrain.py --preset tiny --out OUT  (+ FIXED)
  4. sft        python train_sft.py --preset tiny --out OUT  (+ FIXED, --max-steps SFT_STEPS)
  5. held-out   python -m minivlm.synthetic --out OUT/heldout --train 0 --test 300 --seed 777, then scored

FIXED pins what a machine would otherwise choose: two torch threads, one data worker, seed 0. Bit-identical
results need the same torch version (kernels change between releases) and the same CPU family (a different
SIMD path may round differently); recipe.json records what was used and every file's sha256.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import torch

from ..common import atomic_copy, atomic_write
from ..data.tokenizer import Tokenizer
from ..data.tool import train_tokenizer
from ..infer.evaluate import evaluate, format_report
from ..model.checkpoint import load_vlm, read_meta, sha256_of
from ..synthetic.dataset import write_dataset
from ..train import loop
from ..train.config import RECIPES

FIXED = ["--threads", "2", "--num-workers", "1", "--seed", "0", "--log-every", "100"]
# The tiny preset's own budgets, so that the commands of "Train your own" train the same diet.
PRETRAIN_STEPS, SFT_STEPS = RECIPES[("pretrain", "tiny")]["max_steps"], RECIPES[("sft", "tiny")]["max_steps"]
HELDOUT_SEED = 777
SHORT = dict(pretrain_steps=6, sft_steps=6, train=40, test=20)  # the CI-sized version: seconds, same code
MODEL_FILES = ["sft_vlm_128.pth", "sft_vlm_128.json", "sft_vision/model.safetensors",
               "sft_vision/config.json", "tokenizer.json"]


def stage(name, times, fn):
    """Run one stage, print and keep its wall time; a failed training stage stops the recipe."""
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    rc = fn()
    times[name] = round(time.perf_counter() - t0, 1)
    print(f"== {name}: {times[name] / 60:.1f} min", flush=True)
    if rc:
        raise SystemExit(rc)


def scores_summary(sft, multi) -> dict:
    """{qtype: accuracy %} plus position by number of objects: what the guide's score table shows."""
    out = {q: round(100 * s["acc"], 1) for q, s in sft["by_qtype"].items()}
    out["diff"] = round(100 * multi["by_qtype"]["diff"]["acc"], 1)
    out["position_by_objects"] = {str(n): round(100 * s["acc"], 1)
                                  for n, s in sorted(sft["by_qtype_nobj"]["position"].items())}
    return out


def held_out(out, weights, n_test) -> tuple[dict, str]:
    """Greedy answers on a seed no stage trained on: (summary, printed report)."""
    d = os.path.join(out, "heldout")
    write_dataset(d, n_train=0, n_test=n_test, seed=HELDOUT_SEED)
    model = load_vlm(weights).eval()
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    q_first = bool(read_meta(weights).get("question_first"))
    _, sft = evaluate(model, tok, os.path.join(d, "test_sft.jsonl"), progress=False, question_first=q_first)
    _, multi = evaluate(model, tok, os.path.join(d, "test_multi.jsonl"), progress=False, question_first=q_first)
    text = format_report(sft) + "\n" + format_report(multi)
    return scores_summary(sft, multi), text


def run(args) -> dict:
    # With two threads some CPU kernel of the SFT stage adds in whatever order the threads finish (two runs
    # gave the same pretrain checkpoint but different SFT weights); deterministic algorithms fix the order,
    # so that the same command gives the same bytes (measured: 72 vs 75 samples/s).
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return stages(args)
    finally:
        torch.use_deterministic_algorithms(before)


def stages(args) -> dict:
    out, times = args.out, {}
    data = os.path.join(out, "data")
    common = ["--preset", "tiny", "--out", out, *FIXED]
    pretrain = common + ["--tokenizer", out, "--max-steps", str(args.pretrain_steps)]
    sft = common + ["--max-steps", str(args.sft_steps), *shlex.split(args.sft_extra)]
    stage("data", times, lambda: write_dataset(data, n_train=args.train, n_test=args.test, seed=0) and 0)
    corpus = [os.path.join(data, f) for f in ("pretrain.jsonl", "sft.jsonl", "sft_multi.jsonl")]
    stage("tokenizer", times, lambda: train_tokenizer(corpus, out_dir=out) and 0)
    print("   train_pretrain.py " + shlex.join(pretrain), flush=True)
    stage("pretrain", times, lambda: loop.main("pretrain", pretrain))
    print("   train_sft.py " + shlex.join(sft), flush=True)
    stage("sft", times, lambda: loop.main("sft", sft))
    weights = os.path.join(out, "sft_vlm_128.pth")
    t0 = time.perf_counter()
    scores, text = held_out(out, weights, args.test if args.short else 300)
    times["held-out eval"] = round(time.perf_counter() - t0, 1)
    print(f"\n== held-out scores (seed {HELDOUT_SEED})\n{text}")
    return {"command": "python -m minivlm.recipe " + shlex.join(args.argv), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "seed": 0,
            "heldout_seed": HELDOUT_SEED, "pretrain": "train_pretrain.py " + shlex.join(pretrain),
            "sft": "train_sft.py " + shlex.join(sft), "seconds": times,
            "training_minutes": round(sum(times[k] for k in ("data", "tokenizer", "pretrain", "sft")) / 60, 1),
            "scores": scores, "sha256": {f: sha256_of(os.path.join(out, f)) for f in MODEL_FILES}}


def write_record(folder, record):
    atomic_write(os.path.join(folder, "recipe.json"), (json.dumps(record, indent=1, ensure_ascii=False) + "\n").encode())


def ship(out, dest, record):
    """Copy the model and its record to dest (the package's demo/model when making a release)."""
    os.makedirs(os.path.join(dest, "sft_vision"), exist_ok=True)
    for f in MODEL_FILES:
        atomic_copy(os.path.join(out, f), os.path.join(dest, f))
    write_record(dest, record)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minivlm.recipe", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Make the shipped demo model from nothing: shapes data, tokenizer, pretrain, SFT and "
                    "held-out scores, with fixed flags (two threads, one data worker, seed 0). Writes "
                    "OUT/recipe.json with the stage times, the scores and every file's sha256.")
    p.add_argument("--out", default="out/demo", help="folder for the data, the checkpoints and recipe.json")
    p.add_argument("--short", action="store_true",
                   help="a seconds-long version (6 + 6 steps, 40 scenes): checks that the recipe is "
                        "deterministic, not a useful model")
    p.add_argument("--ship", metavar="DIR", default=None,
                   help="also copy the model and recipe.json to DIR (minivlm/demo/model for a release)")
    p.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS,
                   help="for tinkering: a different value makes a different model than the shipped one")
    p.add_argument("--sft-steps", type=int, default=SFT_STEPS, help="for tinkering, like --pretrain-steps")
    p.add_argument("--sft-extra", default="", metavar="FLAGS",
                   help="for tinkering: more train_sft.py flags, e.g. \"--qtype-weights position=2\"")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv, args.train, args.test = argv, 2000, 300
    if args.short:
        args.pretrain_steps, args.sft_steps = SHORT["pretrain_steps"], SHORT["sft_steps"]
        args.train, args.test = SHORT["train"], SHORT["test"]
    if os.path.exists(os.path.join(args.out, "recipe.json")) or os.path.exists(os.path.join(args.out, "resume")):
        print(f"error: {args.out} holds an earlier run; the recipe starts from nothing: choose a new --out",
              file=sys.stderr)
        return 2
    record = run(args)
    write_record(args.out, record)
    print(f"\nwrote {os.path.join(args.out, 'recipe.json')}: training {record['training_minutes']} min, "
          f"sft_vlm_128.pth sha256 {record['sha256']['sft_vlm_128.pth']}")
    if args.ship:
        ship(args.out, args.ship, record)
        print(f"shipped to {args.ship}")
    return 0
