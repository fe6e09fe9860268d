"""
The shapes world on disk and on the fly: what minivlm trains and is scored on offline.

    write_dataset()        a MiniMind-V dataset: jsonl files + PNG images (or parquet), reproducible from a seed
    preview_grid()         a grid of sample images and their captions, to look at
    SyntheticVLMDataset    fresh examples rendered per index, the same as the files hold; nothing stored
    main()                 python -m minivlm.synthetic --out DIR [--train N --test N --seed S --preview PNG]

The world itself (scenes, pixels, captions, questions) is shapes.py; scoring answers is scoring.py.
"""

import argparse
import io
import json
import os
import random
import sys
import time

import torch
from PIL import Image

from .attention import look_rows, look_targets
from ..common import Progress, atomic_write
from ..data.dataset import make_sample
from ..data.parquet import write_parquet  # pyarrow itself is imported only when a file is written
from ..data.processing import save_image
from ..data.prompt import IMAGE_MARKER
from .world import (CELLS, COLOUR_NAMES, SHAPES, VERSION, caption, conversations_for, example_rng,
                            make_example, multi_turn, render, sample_scene)

# -----------------------------------------------------------------------------
# 1. Files on disk

def write_dataset(out_dir, n_train, n_test, seed=0, size=96, n_multi_train=None,
                  n_multi_test=None, quiet=True, format="jsonl"):
    """Write a complete shapes dataset in MiniMind-V jsonl format; format="parquet" writes the three training
    files as parquet with their images inside (no train_* PNGs); test files stay jsonl, which scoring reads.

    out_dir/
      images/train_000001.png ...      one image per training scene
      images/test_000001.png ...       held-out scenes (fresh noise and jitter)
      images/train_pair_000001_a.png   image pairs for the multi-image task (and _b, test_pair_...)
      pretrain.jsonl                   one caption per training image
      sft.jsonl                        one question per line, several per image
      sft_multi.jsonl                  "What does the first image have ...\\n<image>\\n<image>"
      test_sft.jsonl, test_multi.jsonl held-out questions, with "qtype" and "n_objects"
      meta.json                        seed, size, counts, version
    Image paths in the jsonl files are relative to out_dir. Returns the meta dict.
    """
    if n_multi_train is None:
        n_multi_train = n_train // 4
    if n_multi_test is None:
        n_multi_test = max(1, n_test // 4) if n_test else 0
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    counts = {}
    total = n_train + n_test + 2 * (n_multi_train + n_multi_test)
    progress = Progress(total, "rendering", unit="images", stream=sys.stderr, quiet=quiet)
    done = 0

    def save(img, name):
        # PNG compression dominates the cost of writing; level 1 is twice as fast
        # as the default and only ~10% larger (the noise does not compress anyway).
        if format == "parquet" and name.startswith("train"):
            buf = io.BytesIO()  # the image goes inside the parquet row
            img.save(buf, format="PNG", compress_level=1)
            return buf.getvalue()
        save_image(img, os.path.join(img_dir, name), compress_level=1)
        return "images/" + name

    def write_lines(path, records):
        path = path.replace(".jsonl", ".parquet") if format == "parquet" and not path.startswith("test") else path
        _write_records(os.path.join(out_dir, path), records)
        counts[path] = len(records)

    # single-image splits: the same image serves pretrain (caption) and sft (questions)
    pretrain, sft, test_sft = [], [], []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(1, n + 1):
            rng = example_rng(seed, split, i)
            scene = sample_scene(rng)
            path = save(render(scene, size, rng), f"{split}_{i:06d}.png")
            if split == "train":
                for s in conversations_for("pretrain", [scene], rng):
                    pretrain.append({"conversations": s["conversations"], "image": path})
            for s in conversations_for("sft", [scene], rng):
                (sft if split == "train" else test_sft).append({**s, "image": path})
            done += 1
            progress.update(done)

    # multi-image splits: each pair has its own two images
    multi, test_multi = [], []
    for split, n, out in (("train", n_multi_train, multi), ("test", n_multi_test, test_multi)):
        for i in range(1, n + 1):
            images, samples = make_example("multi", seed, split, i, size)
            paths = [save(img, f"{split}_pair_{i:06d}_{ab}.png") for img, ab in zip(images, "ab")]
            for s in samples:
                out.append({**s, "image": paths if format == "parquet" and split == "train" else ", ".join(paths)})
            done += 2
            progress.update(done)

    write_lines("pretrain.jsonl", pretrain)
    write_lines("sft.jsonl", sft)
    write_lines("sft_multi.jsonl", multi)
    write_lines("test_sft.jsonl", test_sft)
    write_lines("test_multi.jsonl", test_multi)
    meta = {"name": "minivlm-shapes", "version": VERSION, "seed": seed, "size": size,
            "n_train_images": n_train, "n_test_images": n_test,
            "n_train_pairs": n_multi_train, "n_test_pairs": n_multi_test,
            "lines": counts, "shapes": SHAPES, "colours": COLOUR_NAMES, "cells": CELLS}
    atomic_write(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=2).encode())
    return meta


def _write_records(path, records):
    """jsonl (image paths) or, for a .parquet path, MiniMind-V parquet (record["image"]: bytes or a list)."""
    if path.endswith(".parquet"):
        write_parquet(path, [(r["conversations"], r["image"] if isinstance(r["image"], list) else [r["image"]])
                             for r in records])
        return
    atomic_write(path, [(json.dumps(r, ensure_ascii=False) + "\n").encode() for r in records])


def preview_grid(seed=0, n=16, size=96, cols=4, pad=4):
    """A grid of the first n training images plus their captions (PIL has no
    good built-in font, so captions are returned rather than drawn)."""
    rows = -(-n // cols)
    grid = Image.new("RGB", (cols * (size + pad) + pad, rows * (size + pad) + pad), (90, 90, 90))
    caps = []
    for i in range(n):
        rng = example_rng(seed, "train", i + 1)
        scene = sample_scene(rng)
        r, c = divmod(i, cols)
        grid.paste(render(scene, size, rng), (pad + c * (size + pad), pad + r * (size + pad)))
        caps.append(caption(scene))
    return grid, caps


# -----------------------------------------------------------------------------
# 2. On-the-fly dataset: a fresh scene per index, no files

class SyntheticVLMDataset(torch.utils.data.Dataset):
    """Renders example `index` on demand and returns what `data.VLMDataset` returns:
    {"input_ids": LongTensor[T], "labels": LongTensor[T], "pixel_values": FloatTensor[N, 3, S, S]}.

    Example i uses the same random stream as image i+1 of write_dataset with the
    same seed and split, so kind="pretrain" reproduces pretrain.jsonl line i+1
    exactly, and kind="multi" the pairs of sft_multi.jsonl. For kind="sft" one
    question is drawn per index (files hold all of them). `length` can exceed
    any dataset you would write: nothing is stored.

    image_size is the side the model sees (passed to make_sample);
    render_size (default: image_size) is the side the scene is drawn at.
    qtype_weights (kind="sft") sets the odds of each question type, e.g. {"describe": 0.2}; a scene with no
    question of a type of nonzero weight gets one of its questions at equal odds.
    questions_per_image (kind="sft"): that many questions about the image in one conversation, each
    answer trained (see shapes.multi_turn); 1 = one question per sample, like the files.
    look=True adds "look_rows" and "look_keys" to each sample: where each answer's attention should go
    (attn_supervision.py; training with --attn-sup).
    """

    def __init__(self, kind, length, seed, tokenizer, run_length, max_length, image_size=96,
                 split="train", render_size=None, qtype_weights=None, questions_per_image=1, look=False):
        if kind not in ("pretrain", "sft", "multi"):
            raise ValueError(f"unknown kind {kind!r} (expected pretrain, sft or multi)")
        self.kind, self.length, self.seed, self.split = kind, length, seed, split
        # The training loop records this in the checkpoint, so that inference asks questions the way training did.
        self.question_first = kind in ("sft", "multi")
        self.tokenizer, self.run_length, self.max_length = tokenizer, run_length, max_length
        self.image_size, self.render_size = image_size, render_size or image_size
        # kind="sft": relative odds of each question type (default 1 each). Training lowers
        # "describe": its answers are ~20 tokens against 1-2 for the others, so at equal odds it
        # would own most of the token-averaged loss and starve the short answers.
        self.qtype_weights = qtype_weights or {}
        self.questions_per_image = questions_per_image
        self.look = look

    def __len__(self):
        return self.length

    def example(self, idx, with_scenes=False):
        """(images, sample dict) for index idx, before tokenization (handy for inspection); with_scenes=True
        adds the scenes they show."""
        if not 0 <= idx < self.length:
            raise IndexError(idx)
        images, samples, scenes = make_example(self.kind, self.seed, self.split, idx + 1, self.render_size, True)
        sample = self._pick(idx, samples)
        return (images, sample, scenes) if with_scenes else (images, sample)

    def _pick(self, idx, samples):
        """sft: questions_per_image of the scene's questions, drawn by qtype_weights, in one conversation."""
        if len(samples) > 1:  # sft: some of the questions; a fresh stream keeps the choice independent
            rng = example_rng(self.seed, self.split + "-pick", idx + 1)
            weights = [self.qtype_weights.get(s["qtype"], 1.0) for s in samples]
            if not any(weights):  # the scene has no question of the weighted types: any of its questions
                weights = [1.0] * len(samples)
            picked = []
            while len(picked) < self.questions_per_image and sum(weights) > 0:  # weighted, no repeats
                i = rng.choices(range(len(samples)), weights)[0]
                picked.append(samples[i])
                weights[i] = 0.0
            return multi_turn(picked)
        return samples[0]

    def __getitem__(self, idx):
        images, sample, scenes = self.example(idx, with_scenes=True)
        out = make_sample(sample["conversations"], images, self.tokenizer, self.run_length,
                          self.max_length, self.image_size)
        if self.look:
            questions = [m["content"].replace(IMAGE_MARKER, "") for m in sample["conversations"] if m["role"] == "user"]
            out["look_rows"], out["look_keys"] = look_rows(
                out["input_ids"], out["labels"], [look_targets(q, scenes) for q in questions],
                self.tokenizer.placeholder_id, self.run_length, self.tokenizer.eos_id)
        return out


# -----------------------------------------------------------------------------
# 3. Command line

def benchmark(n=500, size=96, seed=0):
    """Images rendered per second on this core (scene sampling + drawing, no PNG)."""
    render(sample_scene(random.Random(0)), size)  # build the noise texture outside the timing
    t0 = time.perf_counter()
    for i in range(n):
        rng = example_rng(seed, "bench", i)
        render(sample_scene(rng), size, rng)
    return n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m minivlm.synthetic",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write the synthetic 'shapes' dataset (MiniMind-V jsonl + PNG images) "
                    "for training and scoring minivlm offline.")
    p.add_argument("--out", help="output folder (created); gets images/, *.jsonl and meta.json")
    p.add_argument("--train", type=int, default=1000,
                   help="number of training images; each gives one pretrain caption and several "
                        "SFT questions, and train//4 image pairs are added for sft_multi.jsonl")
    p.add_argument("--test", type=int, default=200,
                   help="number of held-out test images for test_sft.jsonl (and test//4 pairs "
                        "for test_multi.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    p.add_argument("--size", type=int, default=96,
                   help="image side in pixels (96: each grid cell is exactly 2x2 ViT patches of 16 px)")
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl",
                   help="training files as jsonl + PNG files, or as MiniMind-V parquet (images inside; "
                        "the held-out test files stay jsonl)")
    p.add_argument("--preview", metavar="PNG",
                   help="also write a 4x4 grid of sample images to this file and print their captions")
    p.add_argument("--benchmark", action="store_true", help="print the rendering speed and exit")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)

    if args.benchmark:
        print(f"render: {benchmark(size=args.size):.0f} images/s at {args.size}px (one core)")
        return 0
    if args.preview:
        grid, caps = preview_grid(args.seed, size=args.size)
        save_image(grid, args.preview)
        print(f"wrote preview {args.preview} (row-major):")
        for i, c in enumerate(caps, 1):
            print(f"  {i:2d}. {c}")
    if args.out is None:
        if not args.preview:
            p.error("--out is required (or use --preview / --benchmark alone)")
        return 0
    t0 = time.time()
    meta = write_dataset(args.out, args.train, args.test, args.seed, args.size, quiet=args.quiet, format=args.format)
    print(f"wrote {args.out} in {time.time() - t0:.1f}s: " +
          ", ".join(f"{k} {v}" for k, v in meta["lines"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
