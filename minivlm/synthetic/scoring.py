"""
Scoring answers about the shapes world (shapes.py) exactly.

A model's answer is right when it equals the reference after normalize_answer(), which forgives
what a grader should forgive (case, punctuation, articles, digits, British/American spelling, a
leading "in the"). Free descriptions also get per-attribute credit (describe_attributes), so that a
caption with one wrong colour is not scored like one that is wrong throughout.

score() tallies records by question type and by how many objects the scene holds: a model that
answers about a random object scores 100% on one-object scenes and chance on three, and a single
average would hide it. format_report() prints the table; evaluate.py produces the records.
"""

import re

from .world import CELLS, COLOURS, NUMBER_WORDS, QTYPES, SHAPES, SIZES

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
