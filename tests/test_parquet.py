"""Tests for minivlm/parquet.py: MiniMind-V's parquet datasets, checked against MiniMind-V's own rules."""

import io
import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from minivlm.data.dataset import DataError, VLMDataset, collate_vlm, data_summary
from minivlm.data.parquet import ParquetVLMDataset, grouped_order, open_dataset
from minivlm.data.processing import preprocess_image
from minivlm.data.tool import train_tokenizer

RUN, SIZE = 4, 16  # short placeholder runs and tiny images keep the tests fast
SYSTEM = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"


def png(colour, size=(20, 12)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(colour, size=(32, 32)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


BLACK_8 = png((0, 0, 0), (8, 8))  # MiniMind-V's image of a text-only row


def turns(*texts, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]


def write_parquet(path, rows, row_group_size=2, list_images=False):
    """rows: (conversations, image_bytes); conversations as a list (stored as JSON) or a raw string."""
    convs = [c if isinstance(c, str) else json.dumps(c, ensure_ascii=False) for c, _ in rows]
    image_type = pa.list_(pa.binary()) if list_images else pa.binary()
    table = pa.table({"conversations": pa.array(convs, pa.string()),
                      "image_bytes": pa.array([b for _, b in rows], image_type)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


# MiniMind-V's published schema (conversations: string, image_bytes: binary), one sample of each kind
FIXTURE_ROWS = [
    (turns("<image>\nDescribe the picture.", "A red square on the left."), jpeg((255, 0, 0))),
    (turns("<image>\n图片里有什么？", "两只小猫在草地上玩耍。"), png((0, 0, 255))),
    (turns("What is 2 + 2?", "Four.", "And 3 + 3?", "Six."), BLACK_8),  # text-only
    (turns("<image>\nWhat colour is the circle?", "The circle is blue.", system="You see images."),
     png((0, 255, 0))),
    (turns("Count: 1 2 3 <image>", "Count: 1 2 3 4 5."), jpeg((255, 255, 0))),
]
TWO_IMAGE_ROWS = [  # newer files: image_bytes a list of images, in marker order
    (turns("<image>\n<image>\nWhat differs?", "The colour: red, then blue."), [png((255, 0, 0)), png((0, 0, 255))]),
    (turns("<image>\nDescribe the picture.", "A red square on the left."), [png((255, 0, 0))]),
    (turns("Just text.", "Yes."), [BLACK_8]),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["A red square on the left.", "What colour is the circle?", "The circle is blue.",
             "Describe the picture.", "两只小猫在草地上玩耍。", "图片里有什么？", "Count: 1 2 3 4 5."]
    corpus = tmp_path_factory.mktemp("tok") / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"conversations": turns(f"<image>\n{t}", texts[(i + 2) % 7])},
                                           ensure_ascii=False) for i, t in enumerate(texts * 6)) + "\n")
    return train_tokenizer([str(corpus)], vocab_size=400)


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("pq") / "sft_i2t.parquet", FIXTURE_ROWS)


def dataset(path, tok, **kw):
    return open_dataset(path, tokenizer=tok, run_length=RUN, image_size=SIZE, **kw)


# --- MiniMind-V's rules, implemented independently of minivlm's prompt.py ---------------------

def minimind_v_text(conversations):
    """ChatML exactly as REFERENCE §3: the default system block unless a system turn comes first."""
    text = "" if conversations[0]["role"] == "system" else SYSTEM
    for m in conversations:
        content = m["content"].replace("<image>", "@" * RUN)
        text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
    return text


def minimind_v_labels(ids, tok):
    """MiniMind-V's loss mask: after each `<|im_start|>assistant\\n`, every token up to and including the
    `<|im_end|>\\n` that ends the answer."""
    start, end = tok.encode("<|im_start|>assistant\n"), tok.encode("<|im_end|>\n")
    labels, i = [-100] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(start)] == start:
            j = i + len(start)
            while j < len(ids) and ids[j:j + len(end)] != end:
                j += 1
            for k in range(i + len(start), min(j + len(end), len(ids))):
                labels[k] = ids[k]
            i = j + len(end)
        else:
            i += 1
    return labels


def expected_pixels(blobs):
    return torch.stack([preprocess_image(Image.open(io.BytesIO(b)).convert("RGB"), SIZE) for b in blobs])


@pytest.mark.parametrize("rows, list_images", [(FIXTURE_ROWS, False), (TWO_IMAGE_ROWS, True)])
def test_samples_follow_minimind_v_rules(tok, tmp_path, rows, list_images):
    path = write_parquet(tmp_path / "d.parquet", rows, list_images=list_images)
    ds = dataset(path, tok)
    assert type(ds) is ParquetVLMDataset and len(ds) == len(rows)
    for i, (conversations, blobs) in enumerate(rows):
        s = ds[i]
        ids = tok.encode(minimind_v_text(conversations))
        assert s["input_ids"].tolist() == ids, i
        assert s["labels"].tolist() == minimind_v_labels(ids, tok), i
        blobs = blobs if isinstance(blobs, list) else [blobs]
        n_markers = sum(m["content"].count("<image>") for m in conversations)
        if n_markers == 0:  # text-only: the 8x8 black placeholder is dropped
            assert s["pixel_values"].shape == (0, 3, SIZE, SIZE)
        else:
            torch.testing.assert_close(s["pixel_values"], expected_pixels(blobs))
    assert ds.bad_summary() == f"skipped 0 bad samples of {len(rows)}"


def test_system_turn_replaces_the_default_one(tok, fixture_file):
    ids = dataset(fixture_file, tok)[3]["input_ids"].tolist()
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou see images.<|im_end|>\n<|im_start|>user\n")
    assert "helpful assistant" not in text


def test_index_reads_metadata_only_and_caches_one_row_group(tok, tmp_path):
    rows = [(turns("<image>\nDescribe the picture.", f"answer {i}"), png((i, 0, 0))) for i in range(40)]
    path = write_parquet(tmp_path / "big.parquet", rows, row_group_size=8)
    ds = dataset(path, tok)
    assert ds._file is None and ds._cached is None  # nothing opened or read yet
    assert ds.group_sizes.tolist() == [8] * 5
    for i in [0, 7, 8, 39, 17]:
        s = ds[i]
        trained = s["input_ids"][s["labels"] != -100].tolist()
        assert tok.decode(trained) == f"answer {i}\n"  # + <|im_end|> (not decoded) + "\n"
        assert ds._cached[0] == i // 8  # only the row group of the last sample is held
    state = ds.__getstate__()
    assert state["_file"] is None and state["_cached"] is None  # workers open the file themselves
    order = grouped_order(ds.group_sizes, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(40))
    assert all(len({int(j) // 8 for j in order[k:k + 8]}) == 1 for k in range(0, 40, 8))


# --- bad input --------------------------------------------------------------------------------

GOOD = (turns("<image>\nDescribe the picture.", "A red square on the left."), png((255, 0, 0)))
BAD_ROWS = {
    "invalid JSON": ('[{"role": "user", "content": ', png((255, 0, 0))),
    "unreadable image": (GOOD[0], b"not an image at all"),
    "image count mismatch": (turns("<image> and <image>?", "x"), png((255, 0, 0))),
    "unknown role": ([{"role": "tool", "content": "42"}, {"role": "assistant", "content": "x"}], BLACK_8),
    "tool calls": ([{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "x", "tool_calls": [{"name": "f"}]}], BLACK_8),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_a_located_one_line_error_or_skipped(tok, tmp_path, case):
    path = write_parquet(tmp_path / "bad.parquet", [GOOD, GOOD, BAD_ROWS[case], GOOD], row_group_size=3)
    with pytest.raises(DataError) as e:
        dataset(path, tok)[2]
    assert str(e.value).startswith(f"{path}: row 2: {case}") and "\n" not in str(e.value)
    skipping = dataset(path, tok, skip_bad=True)
    assert torch.equal(skipping[2]["input_ids"], skipping[3]["input_ids"])
    assert skipping.bad_summary() == f"skipped 1 bad samples of 4 (1 {case})"


def test_bad_files_fail_at_construction_naming_the_file(tok, tmp_path):
    good = write_parquet(tmp_path / "good.parquet", [GOOD] * 3)
    cases = {"truncated.parquet": open(good, "rb").read()[:-30], "text.parquet": b"PAR1 hello, not parquet\n"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=f"^{tmp_path / name}: not a parquet file: ") as e:
            dataset(tmp_path / name, tok)
        assert "\n" not in str(e.value)
    pq.write_table(pa.table({"text": ["a"], "image": [b"x"]}), tmp_path / "llava.parquet")
    with pytest.raises(DataError, match=r"llava.parquet: bad columns: no column 'conversations'"):
        dataset(tmp_path / "llava.parquet", tok)


def test_too_long_rows_are_cut_before_an_image_or_skipped_quietly(tok, tmp_path):
    two_turns = turns("<image> colour?", "Red.", "words " * 60 + "<image>", "Blue.")
    rows = [GOOD, (turns("words " * 80 + "<image>", "x"), png((0, 0, 0))), (two_turns, [png((255, 0, 0))] * 2)]
    rows = [(c, b if isinstance(b, list) else [b]) for c, b in rows]
    path = write_parquet(tmp_path / "long.parquet", rows, list_images=True)
    ds = dataset(path, tok, max_length=60)  # no skip_bad: a sample with nothing to train is not an error
    assert torch.equal(ds[1]["input_ids"], ds[2]["input_ids"])
    s = ds[2]
    assert s["pixel_values"].shape == (1, 3, SIZE, SIZE)  # the second image went with its run
    assert (s["input_ids"] == tok.placeholder_id).sum() == RUN
    assert ds.bad_summary() == ("skipped 1 bad samples of 3 (1 too long); "
                                "cut 1 to max_length 60 (1 of them lost images)")


# --- DataLoader workers -----------------------------------------------------------------------

@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_skip_counts_are_exact_with_workers(tok, tmp_path, context):
    rows = [GOOD, BAD_ROWS["unreadable image"], GOOD, BAD_ROWS["invalid JSON"], GOOD, GOOD,
            BAD_ROWS["unreadable image"], GOOD, FIXTURE_ROWS[2], GOOD]
    path = write_parquet(tmp_path / "w.parquet", rows, row_group_size=3)
    ds = dataset(path, tok, skip_bad=True)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_vlm, multiprocessing_context=context)
    batches = list(loader)
    assert [b["image_counts"].tolist() for b in batches][4] == [0, 1]  # a mixed batch: text-only + image
    assert ds.bad_summary() == "skipped 3 bad samples of 10 (2 unreadable image, 1 invalid JSON)"
    assert data_summary(torch.utils.data.ConcatDataset([ds, ds])) == (
        "skipped 6 bad samples of 20 (4 unreadable image, 2 invalid JSON)")


# --- training from parquet --------------------------------------------------------------------

def shapes_parquet(shapes_dir, jsonl, out, text_only_every=3):
    """A shapes-world jsonl as MiniMind-V parquet (images inside), with a text-only row after every
    `text_only_every` rows, so that batches mix image and text-only samples."""
    rows = []
    for i, line in enumerate((shapes_dir / jsonl).read_text().splitlines()[:40]):
        record = json.loads(line)
        names = [n.strip() for n in record["image"].split(",")]
        rows.append((record["conversations"], [(shapes_dir / n).read_bytes() for n in names]))
        if i % text_only_every == 0:
            rows.append((turns("How many sides has a square?", "four"), [BLACK_8]))
    return write_parquet(out, rows, row_group_size=16, list_images=True)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_train_both_stages_from_parquet(shapes_dir, shapes_tokenizer_path, tmp_path, capsys, workers):
    from minivlm.train.loop import main
    out = tmp_path / "run"
    common = ["--preset", "tiny", "--tokenizer", str(shapes_tokenizer_path), "--out", str(out), "--batch-size", "4",
              "--num-workers", workers, "--log-every", "1", "--max-length", "128", "--max-steps", "3"]
    pretrain = shapes_parquet(shapes_dir, "pretrain.jsonl", tmp_path / "pretrain_i2t.parquet")
    sft = shapes_parquet(shapes_dir, "sft_multi.jsonl", tmp_path / "sft_i2t.parquet")  # two images per row
    assert main("pretrain", ["--data", pretrain, *common]) == 0
    assert main("sft", ["--data", sft, *common]) == 0
    logged = capsys.readouterr().out
    assert logged.count("step 3/3 loss") == 2
    assert (out / "sft_vlm_128.pth").exists()


def test_synthetic_parquet_gives_the_samples_of_the_jsonl_files(shapes_dir, shapes_tokenizer_path, tmp_path):
    from minivlm.synthetic.dataset import write_dataset
    from minivlm.data.tokenizer import Tokenizer
    write_dataset(tmp_path, n_train=48, n_test=16, seed=0, format="parquet")  # as conftest's shapes_dir
    assert not list((tmp_path / "images").glob("train_*")) and (tmp_path / "test_sft.jsonl").exists()
    tok = Tokenizer.from_file(shapes_tokenizer_path)
    for name in ("pretrain", "sft", "sft_multi"):
        kw = dict(tokenizer=tok, run_length=36, image_size=96, max_length=200)
        from_jsonl = VLMDataset(shapes_dir / f"{name}.jsonl", **kw)
        from_parquet = ParquetVLMDataset(tmp_path / f"{name}.parquet", **kw)
        assert len(from_jsonl) == len(from_parquet)
        assert from_jsonl.question_first == from_parquet.question_first
        for i in (0, len(from_jsonl) - 1):
            a, b = from_jsonl[i], from_parquet[i]
            assert all(torch.equal(a[k], b[k]) for k in a), (name, i)
    # and a tokenizer trained on the parquet files is the one trained on the jsonl files
    files = [tmp_path / f"{n}.parquet" for n in ("pretrain", "sft", "sft_multi")]
    assert train_tokenizer(files, vocab_size=600)._tok.get_vocab() == tok._tok.get_vocab()


def test_data_stats_and_preview(tok, fixture_file, tmp_path, capsys):
    from minivlm.data.tool import main
    tok.save(tmp_path / "tok")
    assert main(["stats", fixture_file, "--tokenizer", str(tmp_path / "tok"), "--run-length", str(RUN),
                 "--max-length", "30"]) == 0
    out = capsys.readouterr().out
    assert f"{fixture_file}: 5 rows" in out and "images per row: 0: 1 (20.0%), 1: 4 (80.0%)" in out
    assert "text-only rows: 1 (20.0%)" in out and "longer than --max-length 30" in out
    assert main(["preview", fixture_file, "--out", str(tmp_path / "grid.png"), "-n", "5"]) == 0
    out = capsys.readouterr().out
    assert "[text only]" in out and "row 1: '两只小猫在草地上玩耍。'" in out
    assert Image.open(tmp_path / "grid.png").size == (4 * 132 + 4, 2 * 132 + 4)


def test_a_batch_of_text_only_samples_trains(tok, fixture_file):
    from minivlm.model.config import vlm_preset
    from minivlm.model.vlm import MiniMindVLM
    cfg = vlm_preset("tiny")
    cfg.lm.vocab_size, cfg.placeholder_id = tok.vocab_size, tok.placeholder_id
    model = MiniMindVLM(cfg)
    ds = ParquetVLMDataset(fixture_file, tokenizer=tok, run_length=cfg.run_length, image_size=cfg.vision.image_size)
    for rows in ([2, 2], [2, 0, 1]):  # text-only alone, and mixed with image samples
        batch = collate_vlm([ds[i] for i in rows], pad_id=tok.pad_id)
        out = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"],
                    image_counts=batch["image_counts"])
        assert torch.isfinite(out.loss)
        out.loss.backward()


def test_large_row_groups_warn_and_repack_fixes_them(tok, tmp_path, monkeypatch):
    import minivlm.data.parquet
    from minivlm.data.tool import main
    monkeypatch.setattr(minivlm.data.parquet, "MAX_GROUP_ROWS", 4)
    big = write_parquet(tmp_path / "big.parquet", FIXTURE_ROWS * 2, row_group_size=10)
    with pytest.warns(UserWarning, match="row groups of up to 10 rows.*minivlm.data repack"):
        before = dataset(big, tok)
    assert main(["repack", big, "--out", str(tmp_path / "small.parquet"), "--rows", "3"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning now
        after = dataset(tmp_path / "small.parquet", tok)
    assert after.group_sizes.tolist() == [3, 3, 3, 1]
    assert all(torch.equal(before[i]["input_ids"], after[i]["input_ids"]) for i in range(10))
    assert torch.equal(before[9]["pixel_values"], after[9]["pixel_values"])
