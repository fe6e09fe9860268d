"""Scoring a VLM on held-out questions: generate an answer per question, compare with the reference.

Input is a MiniMind-V jsonl whose last assistant turn is the reference answer; lines may carry
"qtype" and "n_objects" (the synthetic world writes them) so accuracy can be broken down by question
type and by how many objects the scene holds. A single average hides a model that answers about a
random object: it scores 100% on one-object scenes and chance on three.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

from ..common import Progress
from ..data.dataset import DataError, _image_names
from .generate import SamplingConfig, answer_batch
from ..data.processing import load_image
from ..synthetic.scoring import format_report, normalize_answer, score


def read_questions(jsonl_path, images_dir=None):
    """Yield dicts {images: [PIL], question, answer, qtype, n_objects, line} from an eval jsonl,
    one line at a time (images are only opened when their question is reached)."""
    images_dir = images_dir or os.path.dirname(os.path.abspath(jsonl_path))
    with open(jsonl_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                conv = rec["conversations"]
                user, ref = conv[-2], conv[-1]
                assert user["role"] == "user" and ref["role"] == "assistant"
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, AssertionError):
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
    try:
        with open(jsonl_path, encoding="utf-8") as f:
            total = sum(1 for line in f if line.strip())
    except UnicodeDecodeError as e:
        raise DataError(f"{jsonl_path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None
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
