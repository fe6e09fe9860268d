"""Tests for the shapes world: the text must be true of the pixels, files must be
well formed and reproducible, and the scorer must score what it claims to."""

import json
import os
import random
import re

import numpy as np
import pytest

from minivlm.synthetic import dataset as synthetic
from minivlm.infer import evaluate as scoring_generic
from minivlm.synthetic import scoring
from minivlm.synthetic import world as S

TOL = 30  # max per-channel distance for a pixel to count as "this palette colour"


def scenes_and_images(n, seed=0, size=96):
    out = []
    for i in range(n):
        rng = random.Random(seed * 100_000 + i)
        scene = S.sample_scene(rng)
        out.append((scene, np.asarray(S.render(scene, size, rng)).astype(int)))
    return out


def colour_mask(pixels, colour):
    return (np.abs(pixels - np.array(S.COLOURS[colour])).max(axis=-1) <= TOL)


def cell_slice(cell, size=96):
    x0, y0, x1, y1 = S.cell_box(cell, size)
    return slice(y0, y1), slice(x0, x1)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# scenes and rendering

def test_render_is_deterministic_and_seed_dependent():
    def draw(seed):
        rng = random.Random(seed)
        return np.asarray(S.render(S.sample_scene(rng), 96, rng))
    a, b, c = draw(7), draw(7), draw(8)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_scenes_are_valid():
    rng = random.Random(0)
    counts = set()
    for _ in range(500):
        scene = S.sample_scene(rng)
        cells = [o.cell for o in scene.objects]
        assert 1 <= len(cells) <= 3
        assert cells == sorted(set(cells)), "distinct cells, in reading order"
        for o in scene.objects:
            assert o.shape in S.SHAPES and o.colour in S.COLOURS and o.size in S.SIZES
        counts.add(len(cells))
    assert counts == {1, 2, 3}


def test_palette_is_distinct_and_far_from_background():
    cols = np.array(list(S.COLOURS.values()))
    dist = np.abs(cols[:, None] - cols[None]).max(-1)
    assert (dist[~np.eye(len(cols), dtype=bool)] > 2 * TOL).all()
    empty = np.asarray(S.render(S.Scene([]), 96, random.Random(0))).astype(int)
    assert empty.max() < 60, "background is dark"
    assert empty.std() > 1, "background is lightly noisy"


def test_each_colour_is_in_its_own_cell_only():
    for scene, px in scenes_and_images(150):
        for colour in S.COLOURS:
            mask = colour_mask(px, colour)
            for cell in range(9):
                here = [o for o in scene.objects if o.cell == cell and o.colour == colour]
                n = mask[cell_slice(cell)].sum()
                if here:
                    assert n >= 40, (scene, colour, cell, n)  # even a small star has ~100 px
                else:
                    assert n == 0, (scene, colour, cell, n)


def test_shapes_stay_inside_their_cells_and_sizes_differ():
    widths = {"small": [], "large": []}
    for scene, px in scenes_and_images(150, seed=1):
        drawn = px.max(-1) > 70  # anything clearly brighter than the background (< 50)
        outside = drawn.copy()
        for o in scene.objects:
            outside[cell_slice(o.cell)] = False
        assert not outside.any(), "pixels drawn outside every object's cell"
        for o in scene.objects:
            ys, xs = np.nonzero(drawn[cell_slice(o.cell)])
            assert xs.min() >= 1 and ys.min() >= 1 and xs.max() <= 30 and ys.max() <= 30  # 1 px margin
            widths[o.size].append(xs.max() - xs.min() + 1)
    # the geometry we aimed for: small ~18-20 px (> 1 patch), large ~28-30 px (< 1 cell)
    assert 17 <= min(widths["small"]) and max(widths["small"]) <= 20, widths["small"]
    assert 26 <= min(widths["large"]) and max(widths["large"]) <= 30, widths["large"]


def test_positions_match_pixel_centroids():
    checked = 0
    for scene, px in scenes_and_images(150, seed=2):
        colours = [o.colour for o in scene.objects]
        for o in scene.objects:
            if colours.count(o.colour) != 1:
                continue
            ys, xs = np.nonzero(colour_mask(px, o.colour))
            row, col = int(ys.mean() // 32), int(xs.mean() // 32)
            assert S.CELLS[row * 3 + col] == S.CELLS[o.cell]
            checked += 1
    assert checked > 150


# -----------------------------------------------------------------------------
# text

def test_caption_wording():
    scene = S.Scene([S.Obj("circle", "red", "large", 0), S.Obj("star", "blue", "small", 4)])
    assert S.caption(scene) == "a large red circle at the top left and a small blue star in the center"
    scene = S.Scene([S.Obj("cross", "orange", "small", 3), S.Obj("square", "white", "large", 5),
                     S.Obj("triangle", "green", "large", 7)])
    assert S.caption(scene) == ("a small orange cross on the left, a large white square on the right "
                                "and a large green triangle at the bottom")
    # the shorter phrasings CLIP's training uses: the article follows the first word left
    assert S.caption(scene, with_size=False) == ("an orange cross on the left, a white square on the right "
                                                 "and a green triangle at the bottom")
    assert S.caption(scene, with_position=False) == "a small orange cross, a large white square and a large green triangle"
    assert S.caption(S.Scene([])) == "nothing"


def test_answers_are_true_of_the_scene():
    rng = random.Random(3)
    seen = set()
    for _ in range(400):
        scene = S.sample_scene(rng)
        objs = scene.objects
        for qtype, q, a in S.questions(scene, rng):
            seen.add(qtype)
            if qtype == "count":
                assert a == S.NUMBER_WORDS[len(objs)]
            elif qtype == "colour":
                shape = re.match(r"What colour is the (\w+)\?", q).group(1)
                match = [o for o in objs if o.shape == shape]
                assert len(match) == 1 and match[0].colour == a
            elif qtype == "shape":
                colour = re.match(r"What shape is the (\w+) object\?", q).group(1)
                match = [o for o in objs if o.colour == colour]
                assert len(match) == 1 and match[0].shape == a
            elif qtype == "position":
                name = re.match(r"Where is the (.+)\?", q).group(1).split()
                match = [o for o in objs if o.shape == name[-1] and (len(name) == 1 or o.colour == name[0])]
                assert len(match) == 1 and S.CELLS[match[0].cell] == a
            elif qtype == "exists":
                colour, shape = re.match(r"Is there an? (\w+) (\w+)\?", q).groups()
                present = any(o.colour == colour and o.shape == shape for o in objs)
                assert a == ("yes" if present else "no")
                if not present:  # a near miss: shares colour or shape with something present
                    assert any(o.colour == colour or o.shape == shape for o in objs)
            elif qtype == "describe":
                assert a == S.caption(scene)
    assert seen == {"colour", "shape", "count", "position", "exists", "describe"}


def test_exists_is_balanced():
    rng = random.Random(4)
    answers = [a for _ in range(200) for t, q, a in S.questions(S.sample_scene(rng), rng) if t == "exists"]
    assert len(answers) == 200
    assert 0.4 <= answers.count("yes") / 200 <= 0.6


def test_articles():
    rng = random.Random(5)
    for _ in range(300):
        for t, q, a in S.questions(S.sample_scene(rng), rng):
            assert not re.search(r"\ba [aeiou]", q + " " + a), (q, a)
            assert not re.search(r"\ban [^aeiou\s]", q + " " + a), (q, a)


def test_diff_pair_answer_is_in_first_and_not_second():
    rng = random.Random(6)
    for _ in range(200):
        first, second = S.sample_diff_pair(rng)
        assert len(first.objects) in (2, 3) and len(second.objects) == len(first.objects) - 1
        answer = S.diff_answer(first, second)
        colour, shape = answer.split()[1:]
        assert any(o.colour == colour and o.shape == shape for o in first.objects)
        assert not any(o.colour == colour and o.shape == shape for o in second.objects)
        # the pixels agree: the removed object's cell is empty in the second image
        gone = next(o for o in first.objects if o not in second.objects)
        px = np.asarray(S.render(second, 96, rng)).astype(int)
        assert px[cell_slice(gone.cell)].max() < 60


# -----------------------------------------------------------------------------
# files

def test_write_dataset_files(tmp_path):
    meta = synthetic.write_dataset(tmp_path, n_train=12, n_test=8, seed=3)
    files = ["pretrain.jsonl", "sft.jsonl", "sft_multi.jsonl", "test_sft.jsonl", "test_multi.jsonl"]
    assert json.loads((tmp_path / "meta.json").read_text())["seed"] == 3
    assert meta["lines"]["pretrain.jsonl"] == 12
    for name in files:
        records = read_jsonl(tmp_path / name)
        assert records, name
        for r in records:
            images = [p.strip() for p in r["image"].split(",")]
            user, assistant = r["conversations"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert user["content"].count("<image>") == len(images)
            assert "<image>" not in assistant["content"]
            for p in images:  # relative to the jsonl's folder
                assert not os.path.isabs(p) and (tmp_path / p).is_file()
            if name.startswith("test_"):
                assert r["qtype"] in S.QTYPES and r["n_objects"] in (1, 2, 3)
            if "multi" in name:
                assert len(images) == 2 and r["qtype"] == "diff"
                assert user["content"] == S.DIFF_QUESTION + "\n<image>\n<image>"
    # train and test images are disjoint files; every sft sample is a single question
    train_imgs = {r["image"] for r in read_jsonl(tmp_path / "sft.jsonl")}
    test_imgs = {r["image"] for r in read_jsonl(tmp_path / "test_sft.jsonl")}
    assert train_imgs and test_imgs and not train_imgs & test_imgs
    assert all(len(r["conversations"]) == 2 for r in read_jsonl(tmp_path / "sft.jsonl"))


def test_write_dataset_is_deterministic(tmp_path):
    def snapshot(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    synthetic.write_dataset(tmp_path / "a", 5, 3, seed=1)
    synthetic.write_dataset(tmp_path / "b", 5, 3, seed=1)
    synthetic.write_dataset(tmp_path / "c", 5, 3, seed=2)
    a, b, c = snapshot(tmp_path / "a"), snapshot(tmp_path / "b"), snapshot(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a["sft.jsonl"] != c["sft.jsonl"]
    assert a["images/train_000001.png"] != c["images/train_000001.png"]


def test_cli_writes_files_and_preview(tmp_path, capsys):
    out, grid = tmp_path / "ds", tmp_path / "grid.png"
    assert synthetic.main(["--out", str(out), "--train", "4", "--test", "4", "--seed", "9",
                           "--preview", str(grid), "--quiet"]) == 0
    for name in ["pretrain.jsonl", "sft.jsonl", "sft_multi.jsonl", "test_sft.jsonl",
                 "test_multi.jsonl", "meta.json", "images/train_000004.png", "images/test_pair_000001_b.png"]:
        assert (out / name).is_file(), name
    from PIL import Image
    assert Image.open(grid).size == (4 * 100 + 4, 4 * 100 + 4)
    text = capsys.readouterr().out
    assert "1. a " in text and "16. a " in text
    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    assert "--preview" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# scoring

@pytest.mark.parametrize("raw, norm", [
    ("Red.", "red"),
    ("  The  RED   circle! ", "red circle"),
    ("2", "two"),
    ("There are 3 shapes", "there are three shapes"),
    ("In the centre.", "center"),
    ("at the top-left", "top left"),
    ("The color", "colour"),
    ("an orange star", "orange star"),
    ("Yes", "yes"),
])
def test_normalize_answer(raw, norm):
    assert scoring_generic.normalize_answer(raw) == norm


def test_score_per_type_and_object_count():
    recs = [
        dict(qtype="count", n_objects=1, prediction="1", answer="one"),
        dict(qtype="count", n_objects=2, prediction="three", answer="two"),
        dict(qtype="count", n_objects=2, prediction="Two.", answer="two"),
        dict(qtype="colour", n_objects=3, prediction="red", answer="red"),
        dict(qtype="position", n_objects=1, prediction="in the centre", answer="center"),
        dict(qtype="exists", n_objects=2, prediction="yes", answer="no"),
    ]
    s = scoring_generic.score(recs)
    assert s["overall"] == {"correct": 4, "total": 6, "acc": pytest.approx(4 / 6)}
    assert s["by_qtype"]["count"]["acc"] == pytest.approx(2 / 3)
    assert s["by_qtype_nobj"]["count"][1]["acc"] == 1.0
    assert s["by_qtype_nobj"]["count"][2]["acc"] == 0.5
    assert s["by_qtype"]["exists"]["acc"] == 0.0
    assert s["by_qtype"]["position"]["acc"] == 1.0
    report = scoring_generic.format_report(s)
    assert "count" in report and "overall" in report and "66.7" in report


def test_describe_attribute_score():
    truth = "a large red circle at the top left and a small blue star in the center"
    perfect = scoring.describe_attributes(truth, truth)
    assert all(c == p == 2 for c, p in perfect.values())
    # right objects and places, one wrong colour and one wrong size
    got = scoring.describe_attributes("a large green circle at the top left and a large blue star in the center", truth)
    assert got == {"position": (2, 2), "colour": (1, 2), "shape": (2, 2), "size": (1, 2)}
    # an invented extra object costs credit
    got = scoring.describe_attributes(truth + " and a small white cross at the bottom", truth)
    assert got["position"] == (2, 3)
    s = scoring_generic.score([dict(qtype="describe", n_objects=2, prediction=truth, answer=truth)])
    assert s["describe_attributes"]["all"]["acc"] == 1.0
    assert "describe (attributes)" in scoring_generic.format_report(s)


# -----------------------------------------------------------------------------
# on-the-fly dataset

def test_on_the_fly_matches_files(tmp_path):
    torch = pytest.importorskip("torch")
    from minivlm.data.dataset import VLMDataset
    from minivlm.data.tool import train_tokenizer

    synthetic.write_dataset(tmp_path, n_train=6, n_test=2, seed=5)
    tok = train_tokenizer([tmp_path / "pretrain.jsonl", tmp_path / "sft.jsonl"], vocab_size=400)
    kw = dict(tokenizer=tok, run_length=4, max_length=128, image_size=96)
    for kind, name in (("pretrain", "pretrain.jsonl"), ("multi", "sft_multi.jsonl")):
        files = VLMDataset(tmp_path / name, **kw)
        fly = synthetic.SyntheticVLMDataset(kind, len(files), seed=5, **kw)
        for i in range(len(files)):
            a, b = files[i], fly[i]
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), (kind, i, k)
    sft = synthetic.SyntheticVLMDataset("sft", 50, seed=5, **kw)
    x = sft[3]
    assert x["pixel_values"].shape == (1, 3, 96, 96) and (x["labels"] != -100).any()
    qtypes = {sft.example(i)[1]["qtype"] for i in range(50)}
    assert len(qtypes) >= 5
    assert torch.equal(sft[7]["input_ids"], sft[7]["input_ids"])


def test_question_first_follows_the_kind():
    kinds = ("pretrain", "sft", "multi")
    assert [synthetic.SyntheticVLMDataset(k, 1, 0, None, 4, 64).question_first for k in kinds] == [False, True, True]


def test_sft_qtype_weights_change_the_mix():
    from minivlm.synthetic.dataset import SyntheticVLMDataset
    plain = SyntheticVLMDataset("sft", 300, 0, None, 36, 160)
    rare = SyntheticVLMDataset("sft", 300, 0, None, 36, 160, qtype_weights={"describe": 0.0})
    assert sum(plain.example(i)[1]["qtype"] == "describe" for i in range(300)) > 20
    assert sum(rare.example(i)[1]["qtype"] == "describe" for i in range(300)) == 0
    only = {t: 0.0 for t in S.QTYPES} | {"colour": 1.0}  # some scenes have no colour question (no unique shape)
    picked = [SyntheticVLMDataset("sft", 300, 0, None, 36, 160, qtype_weights=only).example(i)[1]["qtype"]
              for i in range(300)]
    assert 250 < picked.count("colour") < 300


def test_questions_per_image_asks_several_questions_in_one_conversation(tmp_path):
    torch = pytest.importorskip("torch")
    from minivlm.data.tool import train_tokenizer

    synthetic.write_dataset(tmp_path, n_train=6, n_test=0, seed=5)
    tok = train_tokenizer([tmp_path / "pretrain.jsonl", tmp_path / "sft.jsonl"], vocab_size=400)
    one = synthetic.SyntheticVLMDataset("sft", 40, 5, tok, 4, 200, qtype_weights={"describe": 0.0})
    many = synthetic.SyntheticVLMDataset("sft", 40, 5, tok, 4, 200, qtype_weights={"describe": 0.0},
                                         questions_per_image=3)
    counts = []
    for i in range(40):
        images, s = many.example(i)
        turns = s["conversations"]
        n = len(turns) // 2  # 3, or all the scene has when fewer types have an unambiguous answer
        counts.append(n)
        assert [t["role"] for t in turns] == ["user", "assistant"] * n and n >= 2
        assert turns[0]["content"].endswith("\n<image>") and all("<image>" not in t["content"] for t in turns[1:])
        assert len({t["content"] for t in turns[0::2]}) == n  # different questions, none "describe"
        assert not any(t["content"].startswith("Describe") for t in turns[0::2])
        # the same image and scene as the one-question sample, and its answers are true of that scene
        truth = {q: a for _, q, a in S.questions(S.sample_scene(S.example_rng(5, "train", i + 1)), random.Random(0))}
        assert np.array_equal(np.asarray(images[0]), np.asarray(one.example(i)[0][0]))
        for q, a in zip(turns[0::2], turns[1::2]):
            question = q["content"].replace("\n<image>", "")
            if question in truth and not question.startswith(("Is there", "Where")):
                assert a["content"] == truth[question], (i, question)
        # every answer is trained: the label tokens spell the three answers (+ <|im_end|>\n each)
        x = many[i]
        trained = tok.decode([t for t in x["labels"].tolist() if t != -100], skip_special_tokens=True)
        assert trained.split() == " ".join(t["content"] for t in turns[1::2]).split()
        assert int((x["input_ids"] == tok.placeholder_id).sum()) == 4  # one image run
    assert counts.count(3) >= 35
