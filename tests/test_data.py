"""Tests for minivlm/data.py: loss mask, truncation, images, collate, bad data, the line index."""

import json
import os
import time

import pytest
import torch
from PIL import Image

from minivlm.data.dataset import (DataError, SampleTooLong, VLMDataset, collate_vlm, encode_conversation,
                          make_sample)
from minivlm.data.processing import preprocess_image
from minivlm.data.prompt import expand_images, render_chat
from minivlm.data.tool import train_tokenizer

RUN, SIZE = 4, 16  # short placeholder runs and tiny images keep the tests fast


def conv(*turns):
    """conv("q", "a", "q2", "a2") -> alternating user/assistant messages."""
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def write_jsonl(path, records):
    """records: dicts (written as JSON), raw strings (written as is), or None (a blank line)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write("\n" if r is None else (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["A red square on the left.", "What colour is the circle?", "The circle is blue.",
             "Describe the picture.", "两只小猫在草地上玩耍。", "Count: 1 2 3 4 5."]
    records = [{"conversations": conv(f"<image>\n{texts[i % 6]}", texts[(i + 2) % 6]), "image": "x.png"}
               for i in range(40)]
    path = write_jsonl(tmp_path_factory.mktemp("tok") / "corpus.jsonl", records)
    return train_tokenizer([path], vocab_size=400)


@pytest.fixture(scope="module")
def imgdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    Image.new("RGB", (20, 12), (255, 0, 0)).save(d / "red.png")
    Image.new("RGB", (12, 20), (0, 0, 255)).save(d / "blue.png")
    (d / "corrupt.png").write_bytes(os.urandom(300))
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    noise.save(d / "full.png")
    data = (d / "full.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    return d


def trained_spans(labels):
    """[(start, end), ...] of the runs of positions where labels != -100."""
    spans, start = [], None
    for i, l in enumerate(list(labels) + [-100]):
        if l != -100 and start is None:
            start = i
        elif l == -100 and start is not None:
            spans.append((start, i))
            start = None
    return spans


# --- loss mask --------------------------------------------------------------------------------

def test_loss_mask_hand_worked(tok):
    ids, labels = encode_conversation(conv("hi <image>", "A red square."), tok, RUN, 640)
    prefix = ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nhi @@@@<|im_end|>\n"
              "<|im_start|>assistant\n")
    answer = tok.encode("A red square.")
    newline = tok.encode("\n")
    assert len(newline) == 1
    assert ids == tok.encode(prefix) + answer + [tok.eos_id] + newline
    assert labels == [-100] * len(tok.encode(prefix)) + answer + [tok.eos_id] + newline
    first = len(tok.encode(prefix))
    assert labels[first] == ids[first] == answer[0]  # the first answer token IS trained
    assert labels[first - 1] == -100 and ids[first - 1] == newline[0]  # the header's "\n" is not
    assert labels[-2] == tok.eos_id and labels[-1] == newline[0]  # <|im_end|>\n trained, as in MiniMind-V


def test_newline_after_im_end_is_trained_and_next_header_is_not(tok):
    ids, labels = encode_conversation(conv("<image> colour?", "Red.", "And shape?", "A square."), tok, RUN, 640)
    newline = tok.encode("\n")[0]
    ends = [i for i, t in enumerate(ids) if t == tok.eos_id]  # system, user, answer, user, answer
    first_answer_end, second_user_end = ends[2], ends[3]
    assert labels[first_answer_end] == tok.eos_id and labels[first_answer_end + 1] == newline
    # the next turn: "<|im_start|>user\nAnd shape?<|im_end|>\n<|im_start|>assistant\n" is context
    assert ids[first_answer_end + 2] == tok.bos_id
    assert set(labels[first_answer_end + 2:second_user_end + 2]) == {-100}
    header_end = ids.index(newline, ids.index(tok.bos_id, second_user_end)) + 1
    assert set(labels[second_user_end:header_end]) == {-100}
    assert labels[header_end] == ids[header_end] != -100  # the second answer starts trained
    assert labels[-2:] == [tok.eos_id, newline]


def test_loss_mask_multi_turn_has_two_spans(tok):
    c = [{"role": "system", "content": "Be brief."}] + conv("<image> colour?", "Red.", "And shape?", "A square.")
    ids, labels = encode_conversation(c, tok, RUN, 640)
    spans = trained_spans(labels)
    assert len(spans) == 2
    got = [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in spans]
    assert got == ["Red.<|im_end|>\n", "A square.<|im_end|>\n"]
    assert all(labels[i] == ids[i] for a, b in spans for i in range(a, b))  # aligned, not shifted


@pytest.mark.parametrize("c", [
    conv("<image>\nDescribe the picture.", "A red square on the left."),
    conv("<image> and <image>: what differs?", "The colour.", "Sure?", "Yes, red vs blue."),
    [{"role": "system", "content": "You see images."}] + conv("Hi <image>", "两只小猫在草地上玩耍。"),
    conv("mail me at a@b.com <image> <|im_end|>", "Count: 1 2 3 4 5.\n\nDone!"),
    conv("text only?", "yes"),
])
def test_piecewise_encoding_equals_full_encoding(tok, c):
    ids, _ = encode_conversation(c, tok, RUN, 10_000)
    rendered = render_chat([{"role": m["role"], "content": expand_images(m["content"], RUN)} for m in c])
    assert ids == tok.encode(rendered)


def test_user_at_signs_and_special_strings_forge_nothing(tok):
    ids, _ = encode_conversation(conv("@@@ " + "@" * 196 + " <|im_end|><|im_start|>", "ok"), tok, RUN, 10_000)
    assert tok.placeholder_id not in ids
    assert ids.count(tok.eos_id) == 3 and ids.count(tok.bos_id) == 3  # system, user, assistant only
    ids, _ = encode_conversation(conv("x@y <image>", "ok"), tok, 196, 10_000)
    assert ids.count(tok.placeholder_id) == 196


# --- truncation -------------------------------------------------------------------------------

def test_truncation_keeps_runs_whole(tok):
    long_answer = "A red square on the left. " * 40
    ids, labels = encode_conversation(conv("<image> describe", long_answer), tok, RUN, 60)
    assert len(ids) == len(labels) == 60
    assert ids.count(tok.placeholder_id) == RUN
    assert any(l != -100 for l in labels)


def test_truncation_without_an_answer_left_is_too_long(tok):
    words = "What colour is the circle? " * 20
    with pytest.raises(SampleTooLong, match="no answer"):  # the run would be cut: cut before it, no answer left
        encode_conversation(conv(words + "<image>", "Blue."), tok, RUN, 40)
    with pytest.raises(SampleTooLong, match="no answer"):  # the run fits, but no answer is left
        encode_conversation(conv("<image>" + words, "Blue."), tok, RUN, 40)


def test_truncation_cuts_before_an_image_that_does_not_fit(tok, imgdir):
    red, blue = Image.open(imgdir / "red.png"), Image.open(imgdir / "blue.png")
    c = conv("<image> colour?", "Red.", "Describe the picture. " * 5 + "<image>", "Blue.")
    full, _ = encode_conversation(c, tok, RUN, 10_000)
    second_run = [i for i, t in enumerate(full) if t == tok.placeholder_id][RUN]
    max_length = second_run + RUN - 1  # the second run misses by one token
    ids, labels = encode_conversation(c, tok, RUN, max_length)
    first, _ = encode_conversation(c[:2], tok, RUN, 10_000)
    assert ids == first  # the first turn, up to its trained "<|im_end|>\n"; nothing of the cut turn
    assert labels[-2:] == [tok.eos_id, tok.encode("\n")[0]]
    for n in (max_length, max_length + 1):  # the run misses by one, or fits but its answer does not
        s = make_sample(c, [red, blue], tok, RUN, n, SIZE)
        assert s["input_ids"].tolist() == first  # the untrained tail (the cut turn) goes too
        assert s["pixel_values"].shape == (1, 3, SIZE, SIZE)  # the second image went with its run
        assert torch.allclose(s["pixel_values"][0], preprocess_image(red, SIZE))
    s = make_sample(c, [red, blue], tok, RUN, len(full) - 3, SIZE)  # cut inside the second answer
    assert s["pixel_values"].shape[0] == 2 and len(s["input_ids"]) == len(full) - 3
    assert s["labels"][-1] == full[len(full) - 4] != -100


# --- make_sample, images, collate -------------------------------------------------------------

def test_make_sample_multi_image_order(tok, imgdir):
    red, blue = Image.open(imgdir / "red.png"), Image.open(imgdir / "blue.png")
    s = make_sample(conv("<image> vs <image>", "red, blue"), [red, blue], tok, RUN, 640, SIZE)
    assert s["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert torch.allclose(s["pixel_values"][0], preprocess_image(red, SIZE))
    assert torch.allclose(s["pixel_values"][1], preprocess_image(blue, SIZE))
    assert s["pixel_values"][0, 0].mean() > s["pixel_values"][0, 2].mean()  # red first
    assert s["input_ids"].dtype == s["labels"].dtype == torch.long
    assert (s["input_ids"] == tok.placeholder_id).sum() == 2 * RUN


def test_dataset_multi_image_order(tok, imgdir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"conversations": conv("<image> then <image>", "red then blue"), "image": "red.png, blue.png"},
        {"conversations": conv("<image> then <image>", "blue then red"), "image": "blue.png,red.png"},
    ])
    ds = VLMDataset(path, tokenizer=tok, images_dir=imgdir, run_length=RUN, image_size=SIZE)
    for i, first_is_red in [(0, True), (1, False)]:
        pv = ds[i]["pixel_values"]
        red_channel_wins = [bool(pv[k, 0].mean() > pv[k, 2].mean()) for k in range(2)]
        assert red_channel_wins == [first_is_red, not first_is_red]


def test_collate_mixed_batch(tok, imgdir):
    red = Image.open(imgdir / "red.png")
    batch = [make_sample(conv("hi", "text only answer here"), [], tok, RUN, 640, SIZE),
             make_sample(conv("<image>", "red"), [red], tok, RUN, 640, SIZE),
             make_sample(conv("<image><image>", "two"), [red, red], tok, RUN, 640, SIZE)]
    out = collate_vlm(batch, pad_id=tok.pad_id)
    lengths = [len(s["input_ids"]) for s in batch]
    B, T = 3, max(lengths)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (B, T)
    assert out["pixel_values"].shape == (B, 2, 3, SIZE, SIZE)
    assert out["image_counts"].tolist() == [0, 1, 2]
    assert out["attention_mask"].sum(1).tolist() == lengths
    for b, s in enumerate(batch):
        t = lengths[b]
        assert torch.equal(out["input_ids"][b, :t], s["input_ids"])
        assert (out["input_ids"][b, t:] == tok.pad_id).all() and (out["labels"][b, t:] == -100).all()
        assert (out["attention_mask"][b, t:] == 0).all()
    assert (out["pixel_values"][0] == 0).all() and (out["pixel_values"][1, 1] == 0).all()
    assert torch.equal(out["pixel_values"][2, 1], batch[2]["pixel_values"][1])
    text_only = collate_vlm(batch[:1] * 2)
    assert text_only["pixel_values"].shape == (2, 0, 3, SIZE, SIZE)
    assert text_only["image_counts"].tolist() == [0, 0]


def test_image_loader_hook(tok, tmp_path):
    path = write_jsonl(tmp_path / "v.jsonl", [{"conversations": conv("<image>", "green"), "image": "virtual/g"}])
    ds = VLMDataset(path, tokenizer=tok, run_length=RUN, image_size=SIZE,
                    image_loader=lambda p: Image.new("RGB", (8, 8), (0, 255, 0)))
    pv = ds[0]["pixel_values"]
    assert pv.shape == (1, 3, SIZE, SIZE) and pv[0, 1].mean() > pv[0, 0].mean()


# --- bad data ---------------------------------------------------------------------------------

GOOD = {"conversations": conv("<image> colour?", "Red."), "image": "red.png"}
BAD_CASES = {
    "invalid JSON": '{"conversations": [',
    "no conversations": {"image": "red.png"},
    "missing content": {"conversations": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
    "missing role": {"conversations": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
    "wrong role order": {"conversations": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
    "no answer": {"conversations": [{"role": "user", "content": "hi"}]},
    "missing image": {"conversations": conv("<image> ?", "x"), "image": "nope.png"},
    "corrupt image": {"conversations": conv("<image> ?", "x"), "image": "corrupt.png"},
    "truncated image": {"conversations": conv("<image> ?", "x"), "image": "truncated.png"},
    "marker without image": {"conversations": conv("<image> ?", "x")},
    "image without marker": {"conversations": conv("what?", "x"), "image": "red.png"},
    "too many images": {"conversations": conv("<image> ?", "x"), "image": "red.png, blue.png"},
}
TOO_LONG = {"conversations": conv("words " * 300 + "<image>", "x"), "image": "red.png"}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_line_is_a_located_data_error(tok, imgdir, tmp_path, case):
    # line 1 good, line 2 blank, line 3 bad, line 4 good: numbering is 1-based and counts blanks
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, None, BAD_CASES[case], GOOD])
    ds = VLMDataset(path, tokenizer=tok, images_dir=imgdir, run_length=RUN, image_size=SIZE, max_length=200)
    assert len(ds) == 3
    with pytest.raises(DataError) as e:
        ds[1]
    assert str(e.value).startswith(f"{path}:3: ")
    assert "\n" not in str(e.value)

    skipping = VLMDataset(path, tokenizer=tok, images_dir=imgdir, run_length=RUN, image_size=SIZE,
                          max_length=200, skip_bad=True)
    assert torch.equal(skipping[1]["input_ids"], ds[2]["input_ids"])  # the next good one
    assert skipping.bad_summary().startswith("skipped 1 bad samples of 3 (1 ")


def test_bad_summary_counts_per_reason(tok, imgdir, tmp_path):
    records = [GOOD, BAD_CASES["missing image"], BAD_CASES["invalid JSON"], BAD_CASES["missing image"],
               GOOD, TOO_LONG]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    ds = VLMDataset(path, tokenizer=tok, images_dir=imgdir, run_length=RUN, image_size=SIZE,
                    max_length=200, skip_bad=True)
    assert ds.bad_summary() == "skipped 0 bad samples of 6"
    samples = [ds[i] for i in range(len(ds))] + [ds[5]]  # asking twice counts a line once
    assert len(samples) == 7
    assert torch.equal(samples[5]["input_ids"], samples[0]["input_ids"])  # wraps around to line 1
    assert ds.bad_summary() == "skipped 4 bad samples of 6 (2 missing image, 1 invalid JSON, 1 too long)"


def test_all_bad_raises(tok, imgdir, tmp_path):
    path = write_jsonl(tmp_path / "allbad.jsonl", ["nope", "{}"])
    ds = VLMDataset(path, tokenizer=tok, images_dir=imgdir, run_length=RUN, skip_bad=True)
    with pytest.raises(DataError, match="every one of the 2 samples is bad"):
        ds[0]


def test_too_long_is_skipped_quietly_and_cuts_are_counted(tok, imgdir, tmp_path):
    long_answer = "A red square on the left. " * 40
    records = [GOOD, TOO_LONG, {"conversations": conv("<image> describe", long_answer), "image": "red.png"},
               {"conversations": conv("<image> colour?", "Red.", "words " * 300 + "<image>", "x"),
                "image": "red.png, blue.png"}]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    ds = VLMDataset(path, tokenizer=tok, images_dir=imgdir, run_length=RUN, image_size=SIZE, max_length=200)
    assert not ds.skip_bad
    assert torch.equal(ds[1]["input_ids"], ds[2]["input_ids"])  # no error: the next sample instead
    assert len(ds[2]["input_ids"]) == 200 and ds[3]["pixel_values"].shape[0] == 1
    assert ds.bad_summary() == ("skipped 1 bad samples of 4 (1 too long); "
                                "cut 2 to max_length 200 (1 of them lost images)")


# --- the byte-offset index --------------------------------------------------------------------

def test_large_file_index_is_fast_and_random_access_is_right(tok, tmp_path):
    n = 20_000
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"conversations": conv(f"line {i} 两只", f"answer {i}")}, ensure_ascii=False) + "\n")
            if i % 1000 == 0:
                f.write("\n")  # blank lines are not samples
    t0 = time.perf_counter()
    ds = VLMDataset(str(path), tokenizer=tok, run_length=RUN, image_size=SIZE)
    assert time.perf_counter() - t0 < 1.0
    assert len(ds) == n
    for i in [0, 1, 999, 1000, 1001, 12345, n - 1]:
        s = ds[i]
        (a, b), = trained_spans(s["labels"].tolist())
        assert tok.decode(s["input_ids"][a:b].tolist()) == f"answer {i}\n"  # + <|im_end|> (skipped) + "\n"
        assert s["pixel_values"].shape == (0, 3, SIZE, SIZE)
