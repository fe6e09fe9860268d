"""A guard on the shipped demo model (`python -m minivlm.recipe`'s output, minivlm/demo/model/recipe.json): a
small fixed held-out set (a seed no training run used) must keep the accuracy the README reports: every question
type (colour, shape, count, position, yes/no, describe) and the two-image difference each >= 90 %, and position
about two or three objects (the type the demo learnt last, docs/demo_history.md) >= 90 % on its own. On this set
the shipped model scores 100 % on every type and 96.7 % on the difference (29 of 30)."""

import pytest

from minivlm.model.checkpoint import load_vlm, read_meta
from minivlm.infer.evaluate import evaluate
from minivlm.infer.cli import DEMO_WEIGHTS
from minivlm.synthetic.dataset import write_dataset
from minivlm.data.tokenizer import Tokenizer

SEED = 31337  # held out: the demo model was trained on seed 0's scenes


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    d = tmp_path_factory.mktemp("heldout")
    write_dataset(d, n_train=0, n_test=60, seed=SEED, n_multi_test=30)
    model = load_vlm(DEMO_WEIGHTS).eval()
    tok = Tokenizer.from_file(DEMO_WEIGHTS.rsplit("/", 1)[0] + "/tokenizer.json")
    q_first = bool(read_meta(DEMO_WEIGHTS).get("question_first"))
    _, sft = evaluate(model, tok, d / "test_sft.jsonl", progress=False, question_first=q_first)
    _, multi = evaluate(model, tok, d / "test_multi.jsonl", progress=False, question_first=q_first)
    return sft, multi


def acc(scores, qtype):
    return scores["by_qtype"][qtype]["acc"]


def test_the_demo_model_keeps_what_it_has_learned(scores):
    sft, multi = scores
    assert sft["overall"]["total"] >= 300  # a few hundred questions, a few seconds
    for qtype in ("colour", "count", "shape", "position", "exists", "describe"):
        assert acc(sft, qtype) >= 0.9, (qtype, sft["by_qtype"][qtype])
    assert acc(multi, "diff") >= 0.9, multi["by_qtype"]["diff"]


def test_position_about_several_objects_is_answered(scores):
    sft, _ = scores
    by_n = sft["by_qtype_nobj"]["position"]
    # with one object the name does not matter; with several the model must bind the name to its place
    right = sum(by_n[n]["correct"] for n in (2, 3))
    total = sum(by_n[n]["total"] for n in (2, 3))
    assert total >= 30 and right / total >= 0.9, by_n
