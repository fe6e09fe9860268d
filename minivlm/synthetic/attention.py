"""Telling one attention head where to look: attention supervision, for the shapes world.

Every lookup question ("What colour is the star?", "Where is the red cross?", "Is there a blue
circle?") is answered in two moves: find the object the question names, then read it. A small decoder
trained from scratch learns the second move quickly and the first one only after thousands of steps
stuck on a plateau, answering from a blend of all objects (notebooks/08_when_a_vlm_does_not_look.ipynb).
In the synthetic world we know where every object is, so during training we can show one head the
way: at every position that predicts an answer token, head `head` of decoder layer `layer` gets an
extra loss, minus the log of the attention it pays to the image tokens of the object asked about:

    loss_look = -log  sum_{j in target}  softmax_j(q_pos . k_j / sqrt(hd))

For "Is there …?" with the answer "no" the target is the sequence's first token (`<|im_start|>`, a
"nothing here" slot); for "What does the first image have that the second does not?", the missing object
and its empty place in the second image (look_targets says why). Only training sees this: at test time the
head has to find the object alone, and scoring measures exactly that. (The idea is an old one in VQA, e.g.
"Human Attention in Visual Question Answering", Das et al. 2016, and HINT, Selvaraju et al. 2019.)

    look_targets(question, scenes)    which (image, cell) pairs a question is about (shapes world only)
    look_rows(...)                    -> for one tokenized sample: answer-predicting positions, their target keys
    collate_looks(batch, T)           -> look_rows (R, 2) [sample, position], look_keys (R, T) bool
    AttentionTap                      keeps one layer's input, to recompute its q and k (nothing else changes)
    look_loss(tap, rows, keys, head)  -> (loss, mean attention on the target)
"""

from __future__ import annotations

import math
import re

import torch

from ..model.lm import apply_rope
from ..data.prompt import IGNORE_INDEX
from .world import DIFF_QUESTION
from ..model.vlm import find_image_runs

SINK = "sink"  # the target of a question about nothing that is there: the sequence's first token


def look_targets(question: str, scenes: list):
    """What a shapes-world question points at: a list of (image index, cell); SINK when it names
    nothing that is there; None when no single place answers it ("Describe the image.").

    The questions come from shapes.questions(), whose few fixed phrasings are matched here."""
    question = question.strip()
    if question == DIFF_QUESTION:
        # The missing object in the first image, or its now empty place in the second: in a causal decoder
        # only a token of the second image can see the first, so only there can "something was here" be
        # computed. (Measured, docs/demo_history.md: the second image alone made diff perfect but left the head
        # unable to select by colour.)
        first, second = scenes
        return [(i, o.cell) for o in first.objects if o not in second.objects for i in (0, 1)]
    objects = scenes[0].objects
    if question == "How many shapes are there?":
        return [(0, o.cell) for o in objects]
    for pattern, match in (
            (r"What colour is the (\w+)\?", lambda o, m: o.shape == m[1]),
            (r"What shape is the (\w+) object\?", lambda o, m: o.colour == m[1]),
            (r"Where is the (?:(\w+) )?(\w+)\?", lambda o, m: o.shape == m[2] and m[1] in (None, o.colour)),
            (r"Is there an? (\w+) (\w+)\?", lambda o, m: o.colour == m[1] and o.shape == m[2])):
        m = re.fullmatch(pattern, question)
        if m:
            return [(0, o.cell) for o in objects if match(o, m)] or SINK
    return None


def cell_tokens(cell: int, grid: int) -> list:
    """Indices (within one image's run of grid x grid tokens, row-major) of the patches that overlap a cell
    of the 3 x 3 scene grid. At 96 px with 16-px patches (grid 6) that is exactly the cell's 2 x 2 patches;
    at 224 px (grid 14) a cell spans 4.67 patches, so 6 a side, shared with its neighbours at the edges."""
    row, col = divmod(cell, 3)
    overlaps = lambda i, c: 3 * i < (c + 1) * grid and 3 * (i + 1) > c * grid  # patch i vs cell c, in 1/3 grid units
    return [i * grid + j for i in range(grid) if overlaps(i, row) for j in range(grid) if overlaps(j, col)]


def look_rows(input_ids, labels, targets, placeholder_id: int, run_length: int, eos_id: int):
    """For one tokenized sample: (rows, keys). rows[i] is a position whose next token is an answer token
    (the model predicts the answer there); keys[i] lists the positions it should attend to.

    targets: one entry per question of the conversation, in order (look_targets' result)."""
    grid = math.isqrt(run_length)
    image_starts = find_image_runs(input_ids[None], placeholder_id, run_length)[0].nonzero().flatten().tolist()
    runs = []  # [first, end) of each stretch of trained labels: one per answer
    for t in (labels != IGNORE_INDEX).nonzero().flatten().tolist():
        if runs and runs[-1][1] == t:
            runs[-1][1] = t + 1
        else:
            runs.append([t, t + 1])
    answers = []  # the answer's own tokens: the run up to its <|im_end|> (the whole run if it was cut)
    for first, end in runs:
        ids = labels[first:end].tolist()
        answers.append((first, first + ids.index(eos_id) if eos_id in ids else end))
    rows, keys = [], []
    for target, (first, end) in zip(targets, answers):
        if target is None:
            continue
        if target == SINK:
            where = [0]
        elif any(i >= len(image_starts) for i, _ in target):
            continue  # the image was cut away by --max-length
        else:
            where = [image_starts[i] + p for i, cell in target for p in cell_tokens(cell, grid)]
        rows += list(range(first - 1, end - 1))
        keys += [where] * (end - first)
    return rows, keys


def collate_looks(batch, T: int):
    """Samples' look_rows/look_keys -> look_rows LongTensor (R, 2) of [sample, position] and look_keys
    BoolTensor (R, T): True where row r should attend."""
    rows, keys = [], []
    for b, sample in enumerate(batch):
        for row, where in zip(sample["look_rows"], sample["look_keys"]):
            rows.append([b, row])
            mask = torch.zeros(T, dtype=torch.bool)
            mask[where] = True
            keys.append(mask)
    return (torch.tensor(rows, dtype=torch.long).reshape(-1, 2),
            torch.stack(keys) if keys else torch.zeros(0, T, dtype=torch.bool))


class AttentionTap:
    """Keeps the input (and rotary tables) of one Attention module on every forward, so that the loss
    can recompute q at a few rows and k everywhere. A forward pre-hook: the decoder's code is unchanged."""

    def __init__(self, attention):
        self.attention, self.inputs = attention, None
        self.handle = attention.register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        self.inputs = args[:3]  # x (B, T, h) after input_layernorm, cos, sin (B or 1, 1, T, hd)

    def remove(self):
        self.handle.remove()

    def scores(self, rows, head: int):
        """Attention logits of `head` for the query rows (R, 2) [sample, position]: (R, T)."""
        att = self.attention
        x, cos, sin = self.inputs
        b, pos = rows[:, 0], rows[:, 1]
        q = att.q_proj(x[b, pos]).view(-1, att.n_heads, att.head_dim)[:, head]  # (R, hd)
        cos_r, sin_r = cos[b if cos.shape[0] > 1 else 0, 0, pos], sin[b if sin.shape[0] > 1 else 0, 0, pos]
        q = apply_rope(q, cos_r, sin_r)
        kv_head = head // (att.n_heads // att.n_kv)  # grouped-query: the key head this query head reads
        k = att.k_proj(x).view(*x.shape[:2], att.n_kv, att.head_dim)[:, :, kv_head]  # (B, T, hd)
        k = apply_rope(k, cos[:, 0], sin[:, 0])[b]  # (R, T, hd)
        return torch.einsum("rd,rtd->rt", q, k) / math.sqrt(att.head_dim)  # (R, T)


def look_loss(tap: AttentionTap, rows, keys, head: int):
    """(mean over rows of -log attention mass on the target keys, mean mass), causal mask applied."""
    scores = tap.scores(rows, head).float()  # (R, T)
    causal = torch.arange(scores.shape[1], device=scores.device)[None] <= rows[:, 1:]
    logp = scores.masked_fill(~causal, float("-inf")).log_softmax(-1)
    on_target = torch.logsumexp(logp.masked_fill(~keys, float("-inf")), dim=-1)  # log of the mass, (R,)
    return -on_target.mean(), on_target.exp().mean()
