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
  5. conversations_for()               MiniMind-V conversations, and make_example(): the one
                                       code path shared by the files synthetic.py writes, its
                                       on-the-fly dataset and CLIP's training (clip_train.py)

Scoring a model's answers is scoring.py; files on disk and the dataset are synthetic.py.
"""

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..data.prompt import IMAGE_MARKER, user_turn

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

def caption(scene, with_size=True, with_position=True):
    """'a large red circle at the top left and a small blue star in the center'.

    The VLM's data always uses the full caption. CLIP's training (clip_train.py) also leaves out the
    size words and/or the position words, so that short zero-shot labels ("a red circle") are in
    distribution for it too.
    """
    parts = []
    for o in scene.objects:
        words = o.phrase(with_size)
        part = f"{article(words)} {words}"  # the article agrees with the first word: "an orange star"
        parts.append(f"{part} {CELL_PHRASES[o.cell]}" if with_position else part)
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
# 5. Conversations and examples (shared by write_dataset, SyntheticVLMDataset and preview_grid)

def _turns(question, answer, n_images=1, question_first=False):
    # question_first puts the question before the images: in a causal decoder the image tokens can
    # then attend to the question, so each patch can already "know" whether it is the object asked
    # about. Measured here: with the images first, a 4-layer 128-wide decoder answered shape
    # questions at chance after 1000 SFT steps while describing the same scenes perfectly.
    return [{"role": "user", "content": user_turn(question, n_images, question_first)},
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


def multi_turn(samples):
    """Several one-question samples about the same image(s) -> one conversation, every answer trained.

    The first turn keeps the image markers; later turns ask their question alone. One image forward
    then supervises several answers. The rest of a conversation can give an answer away ("Is there a
    red star?" "yes", then "What colour is the star?"), which only makes that later turn easier: at
    test time every question stands alone, in the first turn's layout.
    """
    if len(samples) == 1:
        return samples[0]
    turns = list(samples[0]["conversations"])
    for s in samples[1:]:
        user, answer = s["conversations"]
        question = user["content"].replace(IMAGE_MARKER, "").strip()
        turns += [{"role": "user", "content": question}, answer]
    return {"conversations": turns, "qtype": samples[0]["qtype"], "n_objects": samples[0]["n_objects"]}


def example_rng(seed, split, index):
    """The random stream that draws example `index` of a split."""
    # One independent stream per (seed, split, index): examples do not depend
    # on how many came before, so files and on-the-fly mode agree, and any
    # index can be regenerated alone. String seeds are hashed with SHA-512 by
    # random.Random, so this is stable across runs and machines.
    return random.Random(f"minivlm-shapes/{seed}/{split}/{index}")


def make_example(kind, seed, split, index, size=96, with_scenes=False):
    """(images, samples) for example `index` of a split, and the scenes too with with_scenes=True.
    "pretrain" and "sft" draw the same scene and image for an index (as write_dataset does);
    "multi" draws its own pair from a separate stream."""
    if kind == "multi":
        rng = example_rng(seed, split + "-pair", index)
        scenes = list(sample_diff_pair(rng))
    else:
        rng = example_rng(seed, split, index)
        scenes = [sample_scene(rng)]
    images = [render(s, size, rng) for s in scenes]
    samples = conversations_for(kind, scenes, rng)
    return (images, samples, scenes) if with_scenes else (images, samples)

