"""
The "shapes" world: a tiny procedurally drawn universe in which minivlm can be
trained and scored offline, with no downloads.

A scene holds 1-3 coloured shapes, each in its own cell of a 3x3 grid, on a
dark, lightly noisy background. Because we drew the picture we know the truth
about it, so we can write captions, ask questions whose answers are certain,
and score a model's answers exactly.

Reading order of this file:
  1. the vocabulary of the world (shapes, colours, cells, sizes)
  2. Obj / Scene and sample_scene()
  3. render()                          pixels
  4. caption() / questions() / diff    text
  5. conversations_for()               MiniMind-V conversations (the one code path
                                       shared by file writing and on-the-fly mode)
  6. write_dataset()                   jsonl + PNG files on disk
  7. normalize_answer() / score() / format_report()
  8. SyntheticVLMDataset               fresh scenes per index, for training
  9. main()                            command line
"""

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from minivlm.tokenizer import place_images

VERSION = 2  # bump when rendering or text changes, so old datasets can be told apart

# -----------------------------------------------------------------------------
# 1. The vocabulary of the world

SHAPES = ["circle", "square", "triangle", "star", "cross"]

# Saturated and far apart from each other (and from the dark background), so a
# pixel's colour names its object without doubt, even for a test that only
# looks at raw RGB values.
COLOURS = {
    "red": (225, 30, 30),
    "green": (40, 190, 60),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 40),
    "purple": (155, 50, 215),
    "orange": (255, 140, 0),
    "white": (245, 245, 245),
}
COLOUR_NAMES = list(COLOURS)

SIZES = ["small", "large"]
# Shape width as a fraction of a cell: at 96 px a cell is 32 px, so large is
# ~29 px and small ~19 px. Small must stay above ~1.2 ViT patches (16 px) wide
# or the shape is no longer recognisable to a patch-based encoder.
SIZE_FRACTION = {"small": 0.6, "large": 0.9}

# Cells are numbered 0..8 row-major, so sorting by cell is reading order.
CELLS = ["top left", "top", "top right",
         "left", "center", "right",
         "bottom left", "bottom", "bottom right"]
# The phrase used in captions: "at the top left", "on the left", "in the center".
CELL_PHRASES = ["at the top left", "at the top", "at the top right",
                "on the left", "in the center", "on the right",
                "at the bottom left", "at the bottom", "at the bottom right"]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven",
                "eight", "nine", "ten"]

QTYPES = ["colour", "shape", "count", "position", "exists", "describe", "diff"]

PRETRAIN_PROMPTS = [
    "Describe this image.",
    "What is in this picture?",
    "What do you see?",
    "Give a short description of the image.",
    "Describe the image briefly.",
]
DIFF_QUESTION = "What does the first image have that the second does not?"


def article(word):
    """'a' or 'an' for the word that follows ("an orange star")."""
    return "an" if word[0] in "aeiou" else "a"


# -----------------------------------------------------------------------------
# 2. Scenes

@dataclass
class Obj:
    shape: str   # one of SHAPES
    colour: str  # one of COLOURS
    size: str    # "small" or "large"
    cell: int    # 0..8, row-major; CELLS[cell] is its name

    def phrase(self, with_size=True):
        """'large red circle' (or 'red circle'), without an article."""
        words = [self.size] if with_size else []
        return " ".join(words + [self.colour, self.shape])


@dataclass
class Scene:
    objects: list = field(default_factory=list)  # list[Obj], kept in reading order (by cell)


def sample_scene(rng, max_objects=3, min_objects=1):
    """A random scene of min_objects..max_objects shapes, each in a distinct cell."""
    n = rng.randint(min_objects, max_objects)
    cells = sorted(rng.sample(range(9), n))  # distinct cells => objects can never overlap
    objects = [Obj(rng.choice(SHAPES), rng.choice(COLOUR_NAMES), rng.choice(SIZES), c) for c in cells]
    return Scene(objects)


def _unique_key_objects(scene, key):
    """Objects whose key(obj) occurs exactly once in the scene."""
    keys = [key(o) for o in scene.objects]
    return [o for o, k in zip(scene.objects, keys) if keys.count(k) == 1]


def sample_diff_pair(rng, max_objects=3):
    """Two scenes where the second is the first minus exactly one object.

    The removed object's colour+shape must be unique in the first scene;
    otherwise "a red circle" would also be present in the second image and the
    answer would be ambiguous. Positions of the remaining objects are kept.
    """
    while True:
        first = sample_scene(rng, max_objects=max_objects, min_objects=2)
        removable = _unique_key_objects(first, lambda o: (o.colour, o.shape))
        if removable:
            break
    gone = rng.choice(removable)
    second = Scene([o for o in first.objects if o is not gone])
    return first, second


# -----------------------------------------------------------------------------
# 3. Rendering

SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap anti-aliasing
_NOISE = None    # one shared background texture, built on first use


def _noise_texture():
    # Drawing fresh noise for every image was ~5x slower than everything else
    # together, so we build one texture once and crop a random window from it.
    global _NOISE
    if _NOISE is None:
        g = np.random.default_rng(12345)
        grey = g.integers(0, 22, size=(512, 512, 1))      # brightness speckle
        tint = g.integers(0, 8, size=(512, 512, 3))       # a little colour noise
        _NOISE = (np.array([14, 14, 20]) + grey + tint).astype(np.uint8)  # all channels <= 50
    return _NOISE


def _background(side, rng):
    tex = _noise_texture()
    if side > tex.shape[0]:  # very large renders: tile the texture
        reps = -(-side // tex.shape[0])
        tex = np.tile(tex, (reps, reps, 1))
    x = rng.randrange(tex.shape[1] - side + 1)
    y = rng.randrange(tex.shape[0] - side + 1)
    return Image.fromarray(np.ascontiguousarray(tex[y:y + side, x:x + side]), "RGB")


def cell_box(cell, size):
    """Pixel box (x0, y0, x1, y1) of a cell; x1/y1 exclusive. At size 96 a cell is 32x32."""
    r, c = divmod(cell, 3)
    return (c * size // 3, r * size // 3, (c + 1) * size // 3, (r + 1) * size // 3)


def _shape_polygon(shape, cx, cy, w):
    """Vertices of a polygonal shape of width w centred on (cx, cy)."""
    h = w / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # pointing up, as wide as it is tall
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":  # five points; a fat inner radius keeps small stars star-like
        pts = []
        for i in range(10):
            r = h if i % 2 == 0 else 0.45 * h
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts
    if shape == "cross":  # a plus sign with arms one third of the width
        t = w / 6
        return [(cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t),
                (cx + h, cy + t), (cx + t, cy + t), (cx + t, cy + h), (cx - t, cy + h),
                (cx - t, cy + t), (cx - h, cy + t), (cx - h, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene, size=96, rng=None):
    """Draw a scene as a size x size RGB PIL image. Same scene + same rng state => same pixels.

    rng (a random.Random) picks the background window and each shape's small
    jitter; if omitted, a fixed Random(0) is used.
    """
    rng = rng if rng is not None else random.Random(0)
    k = SUPERSAMPLE
    img = _background(size * k, rng)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = cell_box(o.cell, size)
        cell = min(x1 - x0, y1 - y0)
        w = SIZE_FRACTION[o.size] * cell
        # Jitter by up to ~2 px at 96 px, but keep half a pixel of margin so
        # the shape (and its anti-aliased edge) never leaves its own cell.
        j = max(0.0, min(2.0 * size / 96, (cell - w) / 2 - 0.75))
        cx = (x0 + x1) / 2 + rng.uniform(-j, j)
        cy = (y0 + y1) / 2 + rng.uniform(-j, j)
        colour = COLOURS[o.colour]
        # PIL includes the far edge pixel, so shrink by one super-pixel to stay inside w.
        cx, cy, w = cx * k, cy * k, w * k - 1
        if o.shape == "circle":
            draw.ellipse([cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2], fill=colour)
        else:
            draw.polygon(_shape_polygon(o.shape, cx, cy, w), fill=colour)
    if k > 1:
        img = img.resize((size, size), Image.BOX)  # exact kxk averaging
    return img


# -----------------------------------------------------------------------------
# 4. Text: captions, questions, the multi-image difference

def caption(scene):
    """'a large red circle at the top left and a small blue star in the center'."""
    parts = [f"{article(o.size)} {o.phrase()} {CELL_PHRASES[o.cell]}" for o in scene.objects]
    if len(parts) <= 1:
        return "".join(parts) or "nothing"
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def questions(scene, rng):
    """At most one (qtype, question, answer) per question type that has an unambiguous answer.

    We only ask about things that pick out exactly one object: "the star" only
    when there is a single star, "the red object" only when one object is red.
    """
    objs = scene.objects
    qs = []

    # colour: of a shape that appears exactly once
    cands = _unique_key_objects(scene, lambda o: o.shape)
    if cands:
        o = rng.choice(cands)
        qs.append(("colour", f"What colour is the {o.shape}?", o.colour))

    # shape: of the one object with a given colour
    cands = _unique_key_objects(scene, lambda o: o.colour)
    if cands:
        o = rng.choice(cands)
        qs.append(("shape", f"What shape is the {o.colour} object?", o.shape))

    # count
    qs.append(("count", "How many shapes are there?", NUMBER_WORDS[len(objs)]))

    # position: name the object by colour+shape (or by shape alone when that is already unique)
    cands = _unique_key_objects(scene, lambda o: (o.colour, o.shape))
    if cands:
        o = rng.choice(cands)
        shape_unique = [p.shape for p in objs].count(o.shape) == 1
        name = o.shape if shape_unique and rng.random() < 0.5 else f"{o.colour} {o.shape}"
        qs.append(("position", f"Where is the {name}?", CELLS[o.cell]))

    # exists: yes/no with equal odds. A "no" is a near miss: a present object
    # with its colour or its shape changed, so the model must check both.
    present = {(o.colour, o.shape) for o in objs}
    if rng.random() < 0.5:
        o = rng.choice(objs)
        colour, shape, answer = o.colour, o.shape, "yes"
    else:
        while True:
            o = rng.choice(objs)
            if rng.random() < 0.5:
                colour, shape = rng.choice([c for c in COLOUR_NAMES if c != o.colour]), o.shape
            else:
                colour, shape = o.colour, rng.choice([s for s in SHAPES if s != o.shape])
            if (colour, shape) not in present:
                break
        answer = "no"
    qs.append(("exists", f"Is there {article(colour)} {colour} {shape}?", answer))

    # describe: the full caption
    qs.append(("describe", "Describe the image.", caption(scene)))
    return qs


def diff_answer(first, second):
    """'a red circle': the one object of `first` that `second` lacks."""
    missing = [o for o in first.objects if o not in second.objects]
    extra = [o for o in second.objects if o not in first.objects]
    if len(missing) != 1 or extra:
        raise ValueError("second scene must be the first minus exactly one object")
    o = missing[0]
    return f"{article(o.colour)} {o.colour} {o.shape}"


# -----------------------------------------------------------------------------
# 5. Conversations (shared by write_dataset and SyntheticVLMDataset)

def _turns(question, answer, n_images=1, question_first=False):
    # question_first puts the question before the images: in a causal decoder the image tokens can
    # then attend to the question, so each patch can already "know" whether it is the object asked
    # about. Measured here: with the images first, a 4-layer 128-wide decoder answered shape
    # questions at chance after 1000 SFT steps while describing the same scenes perfectly.
    return [{"role": "user", "content": place_images(question, n_images, question_first)},
            {"role": "assistant", "content": answer}]


def conversations_for(kind, scenes, rng):
    """MiniMind-V samples for one example: a list of dicts with
    'conversations', 'qtype' and 'n_objects'.

    kind="pretrain": scenes=[scene] -> one caption sample, prompt phrasing varies.
    kind="sft":      scenes=[scene] -> one sample per answerable question type.
                     Each question is its own conversation: a caption in the
                     same conversation would give the answers away.
    kind="multi":    scenes=[first, second] -> one "what is missing" sample.
    """
    if kind == "pretrain":
        (scene,) = scenes
        return [{"conversations": _turns(rng.choice(PRETRAIN_PROMPTS), caption(scene)),
                 "qtype": "describe", "n_objects": len(scene.objects)}]
    if kind == "sft":
        (scene,) = scenes
        return [{"conversations": _turns(q, a, question_first=True), "qtype": t, "n_objects": len(scene.objects)}
                for t, q, a in questions(scene, rng)]
    if kind == "multi":
        first, second = scenes
        return [{"conversations": _turns(DIFF_QUESTION, diff_answer(first, second), n_images=2, question_first=True),
                 "qtype": "diff", "n_objects": len(first.objects)}]
    raise ValueError(f"unknown kind {kind!r} (expected pretrain, sft or multi)")


def _rng(seed, split, index):
    # One independent stream per (seed, split, index): examples do not depend
    # on how many came before, so files and on-the-fly mode agree, and any
    # index can be regenerated alone. String seeds are hashed with SHA-512 by
    # random.Random, so this is stable across runs and machines.
    return random.Random(f"minivlm-shapes/{seed}/{split}/{index}")


def make_example(kind, seed, split, index, size=96):
    """(images, samples) for example `index` of a split. "pretrain" and "sft"
    draw the same scene and image for an index (as write_dataset does);
    "multi" draws its own pair from a separate stream."""
    if kind == "multi":
        rng = _rng(seed, split + "-pair", index)
        scenes = list(sample_diff_pair(rng))
    else:
        rng = _rng(seed, split, index)
        scenes = [sample_scene(rng)]
    images = [render(s, size, rng) for s in scenes]
    return images, conversations_for(kind, scenes, rng)


# -----------------------------------------------------------------------------
# 6. Files on disk

class _Progress:
    """A one-line progress report with rate and ETA, at most once a second."""

    def __init__(self, total, what, stream=sys.stderr, quiet=False):
        self.total, self.what, self.stream, self.quiet = total, what, stream, quiet
        self.t0 = self.last = time.time()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, done):
        now = time.time()
        if self.quiet or (now - self.last < 1.0 and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        line = f"{self.what}: {done}/{self.total} images  {rate:.0f} img/s  ETA {eta:.0f}s"
        end = "\n" if (done >= self.total or not self.tty) else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


def write_dataset(out_dir, n_train, n_test, seed=0, size=96, n_multi_train=None,
                  n_multi_test=None, quiet=True):
    """Write a complete shapes dataset in MiniMind-V jsonl format.

    out_dir/
      images/train_000001.png ...      one image per training scene
      images/test_000001.png ...       held-out scenes (fresh noise and jitter)
      images/train_pair_000001_a.png   image pairs for the multi-image task (and _b, test_pair_...)
      pretrain.jsonl                   one caption per training image
      sft.jsonl                        one question per line, several per image
      sft_multi.jsonl                  "<image>\\n<image>\\nWhat does the first image have ..."
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
    progress = _Progress(total, "rendering", quiet=quiet)
    done = 0

    def save(img, name):
        # PNG compression dominates the cost of writing; level 1 is twice as fast
        # as the default and only ~10% larger (the noise does not compress anyway).
        img.save(os.path.join(img_dir, name), compress_level=1)
        return "images/" + name

    def write_lines(path, records):
        with open(os.path.join(out_dir, path), "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        counts[path] = len(records)

    # single-image splits: the same image serves pretrain (caption) and sft (questions)
    pretrain, sft, test_sft = [], [], []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(1, n + 1):
            rng = _rng(seed, split, i)
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
                out.append({**s, "image": ", ".join(paths)})
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
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return meta


def preview_grid(seed=0, n=16, size=96, cols=4, pad=4):
    """A grid of the first n training images plus their captions (PIL has no
    good built-in font, so captions are returned rather than drawn)."""
    rows = -(-n // cols)
    grid = Image.new("RGB", (cols * (size + pad) + pad, rows * (size + pad) + pad), (90, 90, 90))
    caps = []
    for i in range(n):
        rng = _rng(seed, "train", i + 1)
        scene = sample_scene(rng)
        r, c = divmod(i, cols)
        grid.paste(render(scene, size, rng), (pad + c * (size + pad), pad + r * (size + pad)))
        caps.append(caption(scene))
    return grid, caps


# -----------------------------------------------------------------------------
# 7. Scoring

_DIGITS = {str(i): w for i, w in enumerate(NUMBER_WORDS)}
_SPELLING = {"color": "colour", "colors": "colours", "centre": "center", "grey": "gray"}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(s):
    """Lowercase, drop punctuation and articles, collapse spaces, spell digits
    as words ("2" -> "two"), unify spellings (color -> colour, centre -> center),
    and drop one leading preposition so "in the center" == "center"."""
    s = re.sub(r"[^\w\s]", " ", str(s).lower())
    words = [_SPELLING.get(w, _DIGITS.get(w, w)) for w in s.split()]
    words = [w for w in words if w not in _ARTICLES]
    if len(words) > 1 and words[0] in ("at", "in", "on"):
        words = words[1:]
    return " ".join(words)


def parse_description(text):
    """Objects named in a caption-like text, as dicts with size/colour/shape/cell
    (None where a clause does not say). Used for soft scoring of 'describe'."""
    text = normalize_answer(text)
    cells_by_length = sorted(range(9), key=lambda c: -len(CELLS[c]))  # "top left" before "top"
    objs = []
    for clause in re.split(r"\band\b", text):
        words = clause.split()
        o = {"size": next((w for w in words if w in SIZES), None),
             "colour": next((w for w in words if w in COLOURS), None),
             "shape": next((w for w in words if w in SHAPES), None),
             "cell": next((c for c in cells_by_length if re.search(rf"\b{CELLS[c]}\b", clause)), None)}
        if o["colour"] or o["shape"]:
            objs.append(o)
    return objs


def describe_attributes(prediction, answer):
    """Per-attribute credit for a description: (correct, possible) for each of
    position/colour/shape/size. A true object counts as found when the
    prediction puts some object in its cell; the other attributes are then
    compared with that object. Extra invented objects add to 'possible', so a
    long list of guesses cannot score well."""
    truth, pred = parse_description(answer), parse_description(prediction)
    by_cell = {}
    for p in pred:
        by_cell.setdefault(p["cell"], p)
    denom = max(len(truth), len(pred))
    out = {}
    for attr in ("cell", "colour", "shape", "size"):
        correct = 0
        for t in truth:
            p = by_cell.get(t["cell"])
            correct += p is not None and (attr == "cell" or p[attr] == t[attr])
        out["position" if attr == "cell" else attr] = (correct, denom)
    return out


def _acc(correct, total):
    return {"correct": correct, "total": total, "acc": correct / total if total else 0.0}


def score(records):
    """Exact-match accuracy after normalize_answer.

    records: dicts with 'qtype', 'n_objects', 'prediction', 'answer'.
    Returns {"overall": {...}, "by_qtype": {qtype: {...}},
             "by_qtype_nobj": {qtype: {n_objects: {...}}},
             "describe_attributes": {...}  (only when there are describe records)}
    where each {...} is {"correct", "total", "acc"}.
    """
    tally = {}  # (qtype, n_objects) -> [correct, total]
    attr_tally = {}  # n_objects -> attribute -> [correct, possible]
    for r in records:
        ok = normalize_answer(r["prediction"]) == normalize_answer(r["answer"])
        t = tally.setdefault((r["qtype"], int(r["n_objects"])), [0, 0])
        t[0] += ok
        t[1] += 1
        if r["qtype"] == "describe":
            per = attr_tally.setdefault(int(r["n_objects"]), {})
            for attr, (c, p) in describe_attributes(r["prediction"], r["answer"]).items():
                a = per.setdefault(attr, [0, 0])
                a[0] += c
                a[1] += p

    by_qtype, by_nobj = {}, {}
    for (q, n), (c, t) in sorted(tally.items()):
        by_nobj.setdefault(q, {})[n] = _acc(c, t)
        prev = by_qtype.get(q, {"correct": 0, "total": 0})
        by_qtype[q] = _acc(prev["correct"] + c, prev["total"] + t)
    out = {"overall": _acc(sum(c for c, _ in tally.values()), sum(t for _, t in tally.values())),
           "by_qtype": by_qtype, "by_qtype_nobj": by_nobj}

    if attr_tally:
        def merge(dicts):
            c = sum(a[0] for d in dicts for a in d.values())
            p = sum(a[1] for d in dicts for a in d.values())
            return _acc(c, p)
        attrs = ("position", "colour", "shape", "size")
        out["describe_attributes"] = {
            "all": merge(attr_tally.values()),
            "by_nobj": {n: merge([d]) for n, d in sorted(attr_tally.items())},
            "by_attribute": {a: _acc(sum(d[a][0] for d in attr_tally.values()),
                                     sum(d[a][1] for d in attr_tally.values())) for a in attrs},
        }
    return out


def format_report(scores):
    """A plain-text table: one row per question type, columns 1/2/3 objects and all."""
    def cell(s):
        return f"{100 * s['acc']:6.1f}" if s and s["total"] else "     -"

    qtypes = sorted(scores["by_qtype"], key=lambda q: (QTYPES.index(q) if q in QTYPES else 99, q))
    nobjs = sorted({n for q in qtypes for n in scores["by_qtype_nobj"][q]})
    head = f"{'qtype':<22}" + "".join(f"{str(n) + ' obj':>8}" for n in nobjs) + f"{'all':>8}{'n':>7}"
    lines = ["accuracy % (exact match after normalisation)", head, "-" * len(head)]
    for q in qtypes:
        row = f"{q:<22}" + "".join(f"{cell(scores['by_qtype_nobj'][q].get(n)):>8}" for n in nobjs)
        lines.append(row + f"{cell(scores['by_qtype'][q]):>8}{scores['by_qtype'][q]['total']:>7}")
    lines.append("-" * len(head))
    o = scores["overall"]
    lines.append(f"{'overall':<22}" + " " * (8 * len(nobjs)) + f"{cell(o):>8}{o['total']:>7}")
    d = scores.get("describe_attributes")
    if d:
        row = f"{'describe (attributes)':<22}" + "".join(f"{cell(d['by_nobj'].get(n)):>8}" for n in nobjs)
        lines.append(row + f"{cell(d['all']):>8}")
        lines.append("   by attribute: " + ", ".join(f"{a} {100 * s['acc']:.1f}"
                                                     for a, s in d["by_attribute"].items()))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 8. On-the-fly dataset: a fresh scene per index, no files

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
    qtype_weights (kind="sft") sets the odds of each question type, e.g. {"describe": 0.2}.
    """

    def __init__(self, kind, length, seed, tokenizer, run_length, max_length, image_size=96,
                 split="train", render_size=None, qtype_weights=None):
        if kind not in ("pretrain", "sft", "multi"):
            raise ValueError(f"unknown kind {kind!r} (expected pretrain, sft or multi)")
        from minivlm.data import make_sample  # imported here: the shapes world itself needs no tokenizer
        self._make_sample = make_sample
        self.kind, self.length, self.seed, self.split = kind, length, seed, split
        self.tokenizer, self.run_length, self.max_length = tokenizer, run_length, max_length
        self.image_size, self.render_size = image_size, render_size or image_size
        # kind="sft": relative odds of each question type (default 1 each). Training lowers
        # "describe": its answers are ~20 tokens against 1-2 for the others, so at equal odds it
        # would own most of the token-averaged loss and starve the short answers.
        self.qtype_weights = qtype_weights or {}

    def __len__(self):
        return self.length

    def example(self, idx):
        """(images, sample dict) for index idx, before tokenization (handy for inspection)."""
        if not 0 <= idx < self.length:
            raise IndexError(idx)
        images, samples = make_example(self.kind, self.seed, self.split, idx + 1, self.render_size)
        if len(samples) > 1:  # sft: one of the questions; a fresh stream keeps the choice independent
            weights = [self.qtype_weights.get(s["qtype"], 1.0) for s in samples]
            samples = _rng(self.seed, self.split + "-pick", idx + 1).choices(samples, weights)
        return images, samples[0]

    def __getitem__(self, idx):
        images, sample = self.example(idx)
        return self._make_sample(sample["conversations"], images, self.tokenizer, self.run_length,
                                 self.max_length, self.image_size)


# -----------------------------------------------------------------------------
# 9. Command line

def benchmark(n=500, size=96, seed=0):
    """Images rendered per second on this core (scene sampling + drawing, no PNG)."""
    render(sample_scene(random.Random(0)), size)  # build the noise texture outside the timing
    t0 = time.perf_counter()
    for i in range(n):
        rng = _rng(seed, "bench", i)
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
        grid.save(args.preview)
        print(f"wrote preview {args.preview} (row-major):")
        for i, c in enumerate(caps, 1):
            print(f"  {i:2d}. {c}")
    if args.out is None:
        if not args.preview:
            p.error("--out is required (or use --preview / --benchmark alone)")
        return 0
    t0 = time.time()
    meta = write_dataset(args.out, args.train, args.test, args.seed, args.size, quiet=args.quiet)
    print(f"wrote {args.out} in {time.time() - t0:.1f}s: " +
          ", ".join(f"{k} {v}" for k, v in meta["lines"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
