"""What the shapes world adds to exact-match scoring: per-attribute credit for free descriptions.

A caption with one wrong colour should not score like one that is wrong throughout, so 'describe' answers
also get credit per attribute (position, colour, shape, size) of each object they name. The generic scoring
(normalisation, tallies by question type and object count, the report) is `minivlm/infer/evaluate.py`'s.
"""

import re

from .world import CELLS, COLOURS, SHAPES, SIZES

_SPELLING = {"centre": "center", "grey": "gray"}


def _words(text) -> str:
    """Lowercase, punctuation as spaces, one spelling of each word: what the parser below matches against."""
    return " ".join(_SPELLING.get(w, w) for w in re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def parse_description(text):
    """Objects named in a caption-like text, as dicts with size/colour/shape/cell
    (None where a clause does not say). Used for soft scoring of 'describe'."""
    text = _words(text)
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
