"""Scoring a VLM on held-out questions: generate an answer per question, compare with the reference.

Input is a MiniMind-V jsonl whose last assistant turn is the reference answer; lines may carry
"qtype" and "n_objects" (the synthetic world writes them) so accuracy can be broken down by question
type and by how many objects the scene holds. A single average hides a model that answers about a
random object: it scores 100% on one-object scenes and chance on three.

An answer is right when it equals the reference after normalize_answer(), which forgives what a grader
should forgive (case, punctuation, articles, digits, British/American spelling, a leading "in the").
Rows of qtype "describe" (the shapes world's captions) also get per-attribute credit
(`minivlm/synthetic/scoring.py`).
"""

from __future__ import annotations

import itertools
import os
import re
import sys

from ..common import Progress
from ..data.dataset import DataError, _image_names, jsonl_lines, parse_json
from .generate import SamplingConfig, answer_batch
from ..data.processing import load_image
from ..synthetic.scoring import describe_attributes
from ..synthetic.world import QTYPES


def read_questions(jsonl_path, images_dir=None):
    """Yield dicts {images: [PIL], question, answer, qtype, n_objects, line} from an eval jsonl,
    one line at a time (images are only opened when their question is reached)."""
    images_dir = images_dir or os.path.dirname(os.path.abspath(jsonl_path))
    with open(jsonl_path, "rb") as f:
        for line_no, _, line in jsonl_lines(f):  # as training reads a jsonl (a BOM on line 1 is skipped)
            try:
                rec = parse_json(line)  # training's parser: bad UTF-8, bad Unicode, deep nesting are DataErrors
            except DataError as e:
                raise DataError(f"{jsonl_path}:{line_no}: {e}") from None
            try:
                conv = rec["conversations"]
                user, ref = conv[-2], conv[-1]
                assert user["role"] == "user" and ref["role"] == "assistant"
            except (KeyError, IndexError, TypeError, AssertionError):
                raise DataError(f"{jsonl_path}:{line_no}: not an eval line (needs conversations ending "
                                 f"with a user question and the reference answer)") from None
            qtype, n_objects = rec.get("qtype", "all"), rec.get("n_objects", 0)
            if not isinstance(user["content"], str) or not isinstance(ref["content"], str):
                raise DataError(f"{jsonl_path}:{line_no}: the question and the answer must be strings")
            if not isinstance(qtype, str) or not isinstance(n_objects, int) or isinstance(n_objects, bool):
                raise DataError(f"{jsonl_path}:{line_no}: 'qtype' must be a string and 'n_objects' an integer")
            try:
                names = _image_names(rec.get("image"))
            except DataError as e:
                raise DataError(f"{jsonl_path}:{line_no}: {e}") from None
            images = [load_image(os.path.join(images_dir, n)) for n in names]
            question = user["content"]  # asked exactly as written, <image> markers where they stand
            yield {"images": images, "question": question, "answer": ref["content"], "line": line_no,
                   "qtype": qtype, "n_objects": n_objects}


def evaluate(model, tokenizer, jsonl_path, images_dir=None, batch_size=32, limit=None, max_new_tokens=64,
             progress=True, question_first=False):
    """Greedy answers for every question (or the first `limit`); returns (records, scores) with scores
    from scoring.score. Questions are read batch by batch, so a large file never sits in memory.
    Questions without `<image>` markers get them before (or, question_first, after) the question."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    with open(jsonl_path, "rb") as f:
        total = sum(1 for _ in jsonl_lines(f))  # a line that is not UTF-8 is reported where it is read
    if total == 0:
        raise DataError(f"{jsonl_path}: no questions in the file (it is empty)")
    total = total if limit is None else min(total, limit)
    questions = itertools.islice(read_questions(jsonl_path, images_dir), total)
    records, bar = [], Progress(total, "  scored", stream=sys.stdout, quiet=not progress)
    while chunk := list(itertools.islice(questions, batch_size)):
        preds = answer_batch(model, tokenizer, [(it["images"], it["question"]) for it in chunk], cfg,
                             question_first=question_first)
        for it, pred in zip(chunk, preds):
            records.append({"qtype": it["qtype"], "n_objects": it["n_objects"], "question": it["question"],
                            "answer": it["answer"], "prediction": pred, "line": it["line"]})
        bar.update(len(records))
    return records, score(records)


def worst_mistakes(records, n=10):
    """The wrong answers, those furthest from the reference first (by word overlap)."""
    wrong = [r for r in records if normalize_answer(r["prediction"]) != normalize_answer(r["answer"])]

    def overlap(r):
        a, b = set(normalize_answer(r["prediction"]).split()), set(normalize_answer(r["answer"]).split())
        return len(a & b) / max(1, len(a | b))

    return sorted(wrong, key=overlap)[:n]


def report(records, scores, n_mistakes=8) -> str:
    lines = [format_report(scores)]
    mistakes = worst_mistakes(records, n_mistakes)
    if mistakes:
        lines.append(f"\nworst mistakes ({len(mistakes)} shown):")
        for r in mistakes:
            lines.append(f"  line {r['line']} [{r['qtype']}] {r['question']!r}: got {r['prediction']!r}, "
                         f"expected {r['answer']!r}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Scoring


_NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()
_DIGITS = {str(i): w for i, w in enumerate(_NUMBER_WORDS)}
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
