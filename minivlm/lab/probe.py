"""Looking inside a trained shapes-world VLM: what does it know, and what does it use?

    python -m minivlm.probe [--weights minivlm/demo/model/sft_vlm_128.pth] [--scenes 60] [--seed 99]

Four probes, each on freshly drawn scenes (a seed no training run used):

  yes/no margins   "Is there a <colour> <shape>?" about one-object scenes, for every colour x shape.
                   The answer token's logit of "yes" minus "no", grouped by what the question gets right:
                   both attributes, only the shape, only the colour, neither. A model that checks both
                   says yes only for "both"; one that ignores the shape word gives "both" and "colour
                   only" the same margin.
  question share   For the same questions: how much of the answer position's state, after each
                   decoder layer, changes with the question at all (a state that is one large constant
                   vector whatever is asked cannot answer).
  linear probes    Is each object's shape and colour readable, by a linear classifier, from the image
                   tokens: the vision tower's output, then every decoder layer's output? Once from the
                   mean of the object's cell (2x2 patches), once from single patches.
  attention        From the answer position of "What colour is the <shape>?" on three-object scenes: of
                   the attention onto the three objects' cells, the share on the asked object's cell,
                   per layer (a third = no preference).

    python -m minivlm.probe --binding

  same answer      "Where is the <shape>?" and "What colour is the <shape>?" about each object of three-object
                   scenes in turn: how often all three answers are the same (the question is not read).
  caption pointer  A caption forced to start with an object that is not first in reading order: whose cell
                   does the model write next, the named object's or the first one's?
  attention        From the answer position of "Where is the <shape>?" and "Where is the <colour> object?",
                   the share of attention on the asked object, in the head that prefers it most.

    python -m minivlm.probe --text-lookup 8000

  text lookup      No image at all: a fresh decoder of the demo's size is trained on text that already
                   holds the answer, "I see a red star on the left and a blue cross at the top. What
                   colour is the cross? Answer: blue", and scored on held-out scenes every few hundred
                   steps, with one object and with several. It separates "cannot see" from "cannot look up".

Notebook 08 (`notebooks/08_when_a_vlm_does_not_look.ipynb`) runs these probes as a lesson.
"""

from __future__ import annotations

import argparse
import dataclasses
import random

import torch
import torch.nn.functional as F

from ..model.checkpoint import load_with_tokenizer, tokenizer_beside
from ..model.config import lm_tiny
from ..infer.generate import SamplingConfig, answer_batch, encode_batch, generate, left_pad
from ..infer.cli import DEMO_WEIGHTS
from ..model.lm import MiniMindLM
from ..data.prompt import IGNORE_INDEX, user_turn
from ..infer.evaluate import normalize_answer
from ..synthetic.world import (CELL_PHRASES, CELLS, COLOUR_NAMES, SHAPES, article, caption, questions, render,
                     sample_scene)
from ..data.tokenizer import Tokenizer


class Probe:
    """A model, its tokenizer and how it was trained to place images, ready to be asked questions."""

    def __init__(self, weights: str, tokenizer: str | None = None):
        self.model, self.tok, self.question_first = load_with_tokenizer(weights, tokenizer)
        self.model.eval()
        self.size = self.model.vlm_config.vision.image_size
        self.grid = self.size // self.model.vlm_config.vision.patch_size  # patches per side

    @torch.no_grad()
    def forward(self, image, question: str, **kw):
        """The model's output at the prompt's last position (where the answer's first token is chosen)."""
        content = user_turn(question, 1, self.question_first)
        batch = encode_batch(self.model, self.tok, [([image], [{"role": "user", "content": content}])])
        out = self.model(batch["input_ids"], batch["pixel_values"], image_counts=batch["image_counts"], **kw)
        start = int((batch["input_ids"][0] == self.model.placeholder_id).nonzero()[0])
        return out, start

    def cell_patches(self, cell: int) -> list[int]:
        """Patch indices (row-major) inside one cell of the 3x3 grid."""
        per = self.grid // 3
        r, c = divmod(cell, 3)
        return [(per * r + dr) * self.grid + per * c + dc for dr in range(per) for dc in range(per)]


def yes_no_margins(p: Probe, n_scenes: int, rng: random.Random) -> dict:
    yes, no = p.tok.encode("yes")[0], p.tok.encode("no")[0]
    groups = {"both right": [], "shape only": [], "colour only": [], "neither": []}
    for i in range(n_scenes):
        scene = sample_scene(rng, max_objects=1)
        o, image = scene.objects[0], render(scene, p.size, random.Random(i))
        for colour in COLOUR_NAMES:
            for shape in SHAPES:
                key = ("both right" if (colour, shape) == (o.colour, o.shape) else "shape only" if shape == o.shape
                       else "colour only" if colour == o.colour else "neither")
                out, _ = p.forward(image, f"Is there {article(colour)} {colour} {shape}?")
                groups[key].append((out.logits[0, -1, yes] - out.logits[0, -1, no]).item())
    return groups


def spread(h: torch.Tensor) -> torch.Tensor:
    """(n, ..., d) states of n questions -> (...): their mean distance from their mean, over that mean's size.
    0 = the same vector whatever is asked."""
    mean = h.mean(0)
    return (h - mean).norm(dim=-1).mean(0) / mean.norm(dim=-1)


@torch.no_grad()
def question_share(p: Probe, n_scenes: int, rng: random.Random) -> list[float]:
    """Per decoder layer: how much of the answer position's state depends on the question.

    For each one-object scene, all 35 "Is there a <colour> <shape>?" questions are asked; at each layer's
    output, the spread of the answer position's state across the questions (mean distance from their
    mean) over the size of that mean. Near 0: the state is one constant vector whatever is asked."""
    states, hooks = {}, []
    for k, layer in enumerate(p.model.model.layers):
        hooks.append(layer.register_forward_hook(lambda m, i, o, k=k: states.__setitem__(k, o[0][0, -1])))
    shares = []
    for i in range(n_scenes):
        scene = sample_scene(rng, max_objects=1)
        image = render(scene, p.size, random.Random(i))
        per_q = []
        for colour in COLOUR_NAMES:
            for shape in SHAPES:
                p.forward(image, f"Is there {article(colour)} {colour} {shape}?")
                per_q.append(torch.stack([states[k] for k in sorted(states)]))  # (layers, h)
        shares.append(spread(torch.stack(per_q)).tolist())  # per_q: 35 x (layers, h)
    for hook in hooks:
        hook.remove()
    return torch.tensor(shares).mean(0).tolist()


def linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a softmax regression from x (N, D) to y (N,); 3/4 train, 1/4 test."""
    cut = int(0.75 * len(y))
    x = (x - x[:cut].mean(0)) / (x[:cut].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(x[:cut] @ w + b, y[:cut]) + 1e-3 * (w ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((x[cut:] @ w + b).argmax(1) == y[cut:]).float().mean().item()


def representations(p: Probe, n_scenes: int, rng: random.Random):
    """Per object: its cell's image-token states at the vision output and after each decoder layer."""
    states, hooks = {}, []
    for k, layer in enumerate(p.model.model.layers):
        hooks.append(layer.register_forward_hook(lambda m, i, o, k=k: states.__setitem__(k, o[0])))
    cell_mean, single, labels = {}, {}, []
    for i in range(n_scenes):
        scene = sample_scene(rng, min_objects=3)
        image = render(scene, p.size, random.Random(i))
        _, start = p.forward(image, "Describe the image.")
        L = p.grid * p.grid
        with torch.no_grad():
            vision = p.model.vision_encoder.select_features(encode_batch(
                p.model, p.tok, [([image], [{"role": "user", "content": "<image>"}])])["pixel_values"][0])[0]
        reps = {"vision": vision, **{f"layer {k}": states[k][0, start:start + L] for k in states}}
        for o in scene.objects:
            idx = p.cell_patches(o.cell)
            for name, h in reps.items():
                cell_mean.setdefault(name, []).append(h[idx].mean(0))
                single.setdefault(name, []).append(h[idx[0]])  # the cell's top-left patch alone
            labels.append((SHAPES.index(o.shape), COLOUR_NAMES.index(o.colour)))
    for h in hooks:
        h.remove()
    return cell_mean, single, torch.tensor(labels)


def attention_onto_objects(p: Probe, weights: torch.Tensor, start: int, objects) -> torch.Tensor:
    """One layer's attention weights (1, H, T, T) -> (H, objects): how much the last position (where the answer's
    first token is chosen) attends to each object's cell, per head; `start` is the image run's first position."""
    return torch.stack([weights[0, :, -1, [start + j for j in p.cell_patches(o.cell)]].sum(-1) for o in objects], -1)


def attention_on_asked_object(p: Probe, n_scenes: int, rng: random.Random) -> list[float]:
    """Per layer: of the answer position's attention onto the three objects' cells, the share that lands
    on the asked object's cell (output_attentions=True makes lm.py compute the weights by hand)."""
    shares = []
    for i in range(n_scenes):
        scene = sample_scene(rng, min_objects=3)
        unique = [o for o in scene.objects if [q.shape for q in scene.objects].count(o.shape) == 1]
        if not unique:
            continue
        asked = rng.choice(unique)
        out, start = p.forward(render(scene, p.size, random.Random(i)), f"What colour is the {asked.shape}?",
                               output_attentions=True)
        per_layer = []
        for w in out.attentions:  # (1, H, T, T)
            on = attention_onto_objects(p, w, start, scene.objects).mean(0)  # mean over heads: (objects,)
            per_layer.append((on[scene.objects.index(asked)] / on.sum()).item())
        shares.append(per_layer)
    return torch.tensor(shares).mean(0).tolist()


def three_shape_scenes(rng: random.Random, n: int):
    """n scenes of three objects with three different shapes (so "the <shape>" names exactly one)."""
    while n:
        scene = sample_scene(rng, min_objects=3)
        if len({o.shape for o in scene.objects}) == 3:
            n -= 1
            yield scene


def same_answer_whatever_asked(p: Probe, n_scenes: int, rng: random.Random) -> dict:
    """Ask "Where is the <shape>?" and "What colour is the <shape>?" about each of the three objects of a
    scene. Per question kind: answers right, and scenes where all three answers are the same (a model that
    reads the question gives three different cells; only the colours of a scene may repeat)."""
    stats = {kind: {"right": 0, "same": 0, "asked": 0} for kind in ("position", "colour")}
    for i, scene in enumerate(three_shape_scenes(rng, n_scenes)):
        image = render(scene, p.size, random.Random(i))
        for kind, ask, truth in (("position", "Where is the {}?", lambda o: CELLS[o.cell]),
                                 ("colour", "What colour is the {}?", lambda o: o.colour)):
            said = [normalize_answer(a) for a in answer_batch(
                p.model, p.tok, [([image], ask.format(o.shape)) for o in scene.objects],
                SamplingConfig(max_new_tokens=8, temperature=0.0), question_first=p.question_first)]
            s = stats[kind]
            s["right"] += sum(a == truth(o) for a, o in zip(said, scene.objects))
            s["same"] += len(set(said)) == 1
            s["asked"] += 3
    return stats


@torch.no_grad()
def caption_pointer(p: Probe, n_scenes: int, rng: random.Random) -> dict:
    """Captions list objects in reading order. Force a caption to start with an object that is *not* the
    first ("a small blue star" ...) and see whose cell the model writes next: the named object's (it binds
    the name to its place) or the first object's (it keeps a pointer to "the next object in reading order")."""
    counts = {"named object's cell": 0, "first object's cell": 0, "another object's cell": 0, "no object's cell": 0}
    for i in range(n_scenes):
        scene = sample_scene(rng, min_objects=2)
        o = scene.objects[rng.randrange(1, len(scene.objects))]
        image = render(scene, p.size, random.Random(i))
        batch = encode_batch(p.model, p.tok, [([image], [{"role": "user", "content": user_turn(
            "Describe the image.", 1, p.question_first)}])])
        ids = torch.cat([batch["input_ids"], torch.tensor([p.tok.encode(f"a {o.size} {o.colour} {o.shape}")])], 1)
        new = generate(p.model, ids, batch["pixel_values"], batch["image_counts"], torch.ones_like(ids),
                       SamplingConfig(max_new_tokens=6, temperature=0.0), eos_id=p.tok.eos_id, pad_id=p.tok.pad_id)
        text = p.tok.decode(new[0].tolist(), skip_special_tokens=True).strip()
        cells = [c for c, phrase in enumerate(CELL_PHRASES) if text.startswith(phrase)]
        cell = max(cells, key=lambda c: len(CELL_PHRASES[c])) if cells else None  # "at the top left" over "at the top"
        key = ("named object's cell" if cell == o.cell else "first object's cell" if cell == scene.objects[0].cell
               else "another object's cell" if cell in [q.cell for q in scene.objects] else "no object's cell")
        counts[key] += 1
    return counts


def attention_by_name(p: Probe, n_scenes: int, rng: random.Random) -> dict:
    """Per layer, the largest share (over heads) of the answer position's attention onto the three objects'
    cells that lands on the asked one, for "Where is the <shape>?" and for "Where is the <colour> object?"
    (a phrasing the demo never trained on; only scenes whose asked colour is unique)."""
    shares = {"Where is the <shape>?": [], "Where is the <colour> object?": []}
    for i, scene in enumerate(three_shape_scenes(rng, n_scenes)):
        image = render(scene, p.size, random.Random(i))
        asked = rng.choice(scene.objects)
        unique_colour = [o.colour for o in scene.objects].count(asked.colour) == 1
        for name, question in (("Where is the <shape>?", f"Where is the {asked.shape}?"),
                               ("Where is the <colour> object?", f"Where is the {asked.colour} object?")):
            if name.startswith("Where is the <colour>") and not unique_colour:
                continue
            out, start = p.forward(image, question, output_attentions=True)
            per_layer = []
            for w in out.attentions:  # (1, H, T, T)
                on = attention_onto_objects(p, w, start, scene.objects)  # (H, 3)
                per_layer.append((on[:, scene.objects.index(asked)] / on.sum(-1)).max().item())
            shares[name].append(per_layer)
    return {name: torch.tensor(s).mean(0).tolist() for name, s in shares.items() if s}


LOOKUP_TYPES = ("colour", "shape", "position", "exists")


def lookup_sample(tok: Tokenizer, rng: random.Random, types=LOOKUP_TYPES,
                  max_objects: int = 3) -> tuple[str, int, list[int], list[int]]:
    """(qtype, n_objects, prompt ids, answer ids): the scene as words, a question, the answer."""
    scene = sample_scene(rng, max_objects=max_objects)
    qtype, question, answer = rng.choice([q for q in questions(scene, rng) if q[0] in types])
    return (qtype, len(scene.objects), tok.encode(f"I see {caption(scene)}. {question} Answer:"),
            tok.encode(" " + answer))


@torch.no_grad()
def lookup_accuracy(model, test) -> dict:
    """{(qtype, several objects?): % of first answer tokens right}, greedy, one left-padded batch per 100."""
    model.eval()
    hits = {}
    for i in range(0, len(test), 100):
        chunk = test[i:i + 100]
        ids, mask = left_pad([p for _, _, p, _ in chunk])
        best = model(ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].argmax(-1)
        for (qtype, n, _, a), b in zip(chunk, best.tolist()):
            hits.setdefault((qtype, n > 1), []).append(b == a[0])
    model.train()
    return {k: 100 * sum(v) / len(v) for k, v in hits.items()}


def text_lookup(tok: Tokenizer, steps: int, seed: int, every: int = 500, lr: float = 1e-3, batch: int = 32,
                types=LOOKUP_TYPES, max_objects: int = 3, tie: bool = True):
    """Train a fresh demo-sized decoder on the text lookup; yield (step, accuracy dict, state share) every
    `every` steps. The state share is the `spread` of the last layer's state at the answer position over
    the last 100 held-out questions scored: ~0 = deaf.
    tie=False: untied embeddings at unit scale (LMConfig.tie_word_embeddings)."""
    torch.manual_seed(seed)
    model = MiniMindLM(dataclasses.replace(lm_tiny(), vocab_size=tok.vocab_size, tie_word_embeddings=tie))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, test_rng = random.Random(seed), random.Random(seed + 1)
    test = [lookup_sample(tok, test_rng, types, max_objects) for _ in range(400)]
    last = {}
    model.model.layers[-1].register_forward_hook(lambda m, i, o: last.__setitem__("h", o[0][:, -1]))
    for step in range(1, steps + 1):
        samples = [lookup_sample(tok, rng, types, max_objects) for _ in range(batch)]
        T = max(len(p) + len(a) for _, _, p, a in samples)
        ids = torch.full((batch, T), tok.pad_id)
        labels = torch.full((batch, T), IGNORE_INDEX)
        for b, (_, _, p, a) in enumerate(samples):
            ids[b, :len(p) + len(a)] = torch.tensor(p + a)
            labels[b, len(p):len(p) + len(a)] = torch.tensor(a)  # only the answer is trained
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            acc = lookup_accuracy(model, test)  # its last batch's states are in `last`
            yield step, acc, spread(last["h"]).item()


def print_text_lookup(tok: Tokenizer, steps: int, seed: int, types=LOOKUP_TYPES, max_objects: int = 3,
                      tie: bool = True, every: int = 500):
    print(f"text lookup (no image): a fresh decoder of the demo's size ({'tied' if tie else 'untied'} "
          f"embeddings); % right on 400 held-out questions,")
    print("first with one object in the scene, then with two or three; 'state': how much the answer position's")
    print("last-layer state changes between questions (0 = the same vector whatever is asked)")
    print(f"  {'step':>6s}  " + "  ".join(f"{t:>15s}" for t in types) + f"  {'state':>6s}")
    for step, acc, share in text_lookup(tok, steps, seed, every, types=types, max_objects=max_objects, tie=tie):
        cells = [f"{acc.get((t, False), float('nan')):5.0f} / {acc.get((t, True), float('nan')):5.0f}"
                 for t in types]
        print(f"  {step:6d}  " + "  ".join(f"{c:>15s}" for c in cells) + f"  {share:6.1%}", flush=True)


def print_binding(p: Probe, n_scenes: int, seed: int):
    stats = same_answer_whatever_asked(p, n_scenes, random.Random(seed))
    print(f"each of the 3 objects of {n_scenes} three-object scenes asked about in turn (3 different shapes):")
    for kind, s in stats.items():
        question = "Where is the <shape>?" if kind == "position" else "What colour is the <shape>?"
        print(f"  {question:28s} right {s['right']:4d} / {s['asked']}   the same answer all three times: "
              f"{s['same']:3d} of {n_scenes} scenes")
    counts = caption_pointer(p, n_scenes, random.Random(seed + 1))
    print(f"\n'Describe the image.' with the reply forced to start with an object that is not the first in reading "
          f"order\n('a small blue star'); the cell the model writes next, {n_scenes} scenes of 2-3 objects:")
    print("  " + "   ".join(f"{k}: {v}" for k, v in counts.items()))
    shares = attention_by_name(p, n_scenes, random.Random(seed + 2))
    print("\nof the answer position's attention onto the 3 objects' cells, the share on the asked object, in the head")
    print("that prefers it most (per layer; with no preference the best of 4 noisy heads still lands at ~55-70%):")
    for name, per_layer in shares.items():
        print(f"  {name:30s} " + "  ".join(f"layer {k}: {v:.0%}" for k, v in enumerate(per_layer)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minivlm.probe", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=DEMO_WEIGHTS, help="a shapes-world checkpoint (default: the demo model)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside --weights)")
    ap.add_argument("--scenes", type=int, default=60, help="scenes per probe")
    ap.add_argument("--seed", type=int, default=99, help="seed of the probe scenes (never used in training)")
    ap.add_argument("--text-lookup", type=int, default=None, metavar="STEPS",
                    help="instead: train a fresh demo-sized decoder on the lookup in text for STEPS steps")
    ap.add_argument("--types", default=",".join(LOOKUP_TYPES),
                    help="with --text-lookup: the question types to train and score, comma-separated")
    ap.add_argument("--max-objects", type=int, default=3, choices=[1, 2, 3],
                    help="with --text-lookup: objects per scene at most (1: no lookup needed, only comparisons)")
    ap.add_argument("--untied", action="store_true",
                    help="with --text-lookup: untied embeddings at unit scale instead of MiniMind's tied ones")
    ap.add_argument("--every", type=int, default=500, help="with --text-lookup: score every N steps")
    ap.add_argument("--binding", action="store_true",
                    help="instead: the three probes of 'Where is ...?' (notebook 08): does the answer depend "
                         "on the question, whose cell does a forced caption write, where does the answer position look")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.text_lookup is not None:
        types = tuple(t.strip() for t in args.types.split(","))
        if not set(types) <= set(LOOKUP_TYPES):
            ap.error(f"--types: choose from {', '.join(LOOKUP_TYPES)}")
        print_text_lookup(Tokenizer.from_file(args.tokenizer or tokenizer_beside(args.weights)), args.text_lookup,
                          args.seed, types, args.max_objects, tie=not args.untied, every=args.every)
        return 0
    p = Probe(args.weights, args.tokenizer)
    if args.binding:
        print_binding(p, args.scenes, args.seed)
        return 0

    print("yes/no margin (logit yes - logit no) on one-object scenes, by what the question gets right:")
    for name, m in yes_no_margins(p, args.scenes, random.Random(args.seed)).items():
        print(f"  {name:12s} n={len(m):4d}  mean margin {sum(m) / len(m):+.2f}  answers yes {sum(x > 0 for x in m) / len(m):.0%}")

    share = question_share(p, max(1, args.scenes // 6), random.Random(args.seed + 3))
    print("\nhow much of the answer position's state changes with the question (35 yes/no questions about")
    print("one-object scenes; spread across the questions / size of their mean; near 0 = deaf to the question):")
    print("  " + "  ".join(f"layer {k}: {s:.1%}" for k, s in enumerate(share)))

    cell_mean, single, y = representations(p, args.scenes * 2, random.Random(args.seed + 1))
    print("\nlinear probe accuracy, held out (shape: chance 20%, colour: chance 14%)")
    print(f"  {'states':10s} {'cell mean: shape':>17s} {'colour':>7s}   {'one patch: shape':>17s} {'colour':>7s}")
    for name in cell_mean:
        a = [linear_probe(torch.stack(d[name]), y[:, j], n) for d in (cell_mean, single) for j, n in ((0, 5), (1, 7))]
        print(f"  {name:10s} {a[0]:17.0%} {a[1]:7.0%}   {a[2]:17.0%} {a[3]:7.0%}")

    shares = attention_on_asked_object(p, args.scenes, random.Random(args.seed + 2))
    print("\n'What colour is the <shape>?' on 3-object scenes: of the answer position's attention onto the")
    print("objects' cells, the share on the asked object's cell (1/3 = no preference):")
    print("  " + "  ".join(f"layer {k}: {s:.0%}" for k, s in enumerate(shares)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
