"""Text and files from outside: one rule for each kind of damage, whichever road reads them.

  invalid Unicode (a lone surrogate, a byte that is not UTF-8)  -> DataError naming file and line/row
      (skippable with --skip-bad), a one-line error for --prompt, a message and the chat goes on in --chat
  JSON nested too deeply for Python's parser                     -> DataError "nested too deeply"
  a damaged parquet row group                                    -> one meaningful line, also from workers
  a UTF-8 BOM at the start of a jsonl                            -> skipped by every reader
  bad flag values                                                -> a one-line error and exit code 2
"""
import io
import json
import shutil
import sys
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import minivlm.data.processing as processing
import minivlm.train.loop as train
from minivlm.data.dataset import DataError, VLMDataset
from minivlm.data.parquet import ParquetVLMDataset
from minivlm.data.tokenizer import Tokenizer
from minivlm.data.tool import main as data_main
from minivlm.data.tool import tokenizer_main
from minivlm.infer.cli import main as eval_main

SURROGATE = '{"conversations": [{"role": "user", "content": "<image>\\nWhat is \\ud800?"}, ' \
            '{"role": "assistant", "content": "a square"}], "image": "images/train_000001.png"}'
DEEP = "[" * 10_000  # valid JSON up to where it ends; Python's parser gives up long before


def one_error_line(text):
    lines = text.strip().splitlines()
    assert "Traceback" not in text, text
    assert len(lines) >= 1 and lines[-1].startswith("error: "), text
    return lines[-1]


def jsonl_with(shapes_dir, tmp_path, bad_line, at=2, name="data.jsonl", source="pretrain.jsonl"):
    """A copy of 8 lines of a shapes jsonl (and its images) with `bad_line` put in as line `at` (1-based)."""
    lines = (shapes_dir / source).read_text().splitlines()[:8]
    if bad_line is not None:
        lines.insert(at - 1, bad_line)
    shutil.copytree(shapes_dir / "images", tmp_path / "images", dirs_exist_ok=True)
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def train_args(data, tok, out, *extra):
    return ["--preset", "tiny", "--data", str(data), "--tokenizer", str(tok), "--out", str(out),
            "--batch-size", "4", "--num-workers", "0", "--log-every", "1", "--warmup-steps", "0",
            "--max-length", "128", "--max-steps", "1", *extra]


@pytest.fixture()
def ckpt(tiny_run):
    return str(tiny_run / "pretrain_vlm_128.pth")


@pytest.fixture(scope="module")
def tok(shapes_tokenizer_path):
    return Tokenizer.from_file(shapes_tokenizer_path)


# ---------------------------------------------------------------------------------------------
# 6, 7: invalid Unicode and deep nesting in data files: one DataError, whichever road reads the file


@pytest.mark.parametrize("bad, reason", [(SURROGATE, "invalid text"), (DEEP, "nested too deeply")],
                         ids=["surrogate", "deep"])
def test_bad_text_in_a_jsonl_is_a_located_data_error_and_skippable(shapes_dir, tok, tmp_path, bad, reason):
    path = jsonl_with(shapes_dir, tmp_path, bad, at=1)  # line 1: also read when the dataset is built
    ds = VLMDataset(path, tokenizer=tok, run_length=4, image_size=32, max_length=128)
    with pytest.raises(DataError) as e:
        ds[0]
    assert str(e.value).startswith(f"{path}:1: {reason}: ") and "\n" not in str(e.value)
    skipping = VLMDataset(path, tokenizer=tok, run_length=4, image_size=32, max_length=128, skip_bad=True)
    assert torch.equal(skipping[0]["input_ids"], skipping[1]["input_ids"])
    assert skipping.bad_summary() == f"skipped 1 bad samples of 9 (1 {reason})"


def test_bad_text_in_a_parquet_row_is_a_located_data_error(shapes_dir, tok, tmp_path):
    good = json.loads((shapes_dir / "pretrain.jsonl").read_text().splitlines()[0])
    image = (shapes_dir / good["image"]).read_bytes()
    convs = [json.dumps(good["conversations"]), json.loads(SURROGATE)["conversations"], DEEP]
    convs[1] = json.dumps(convs[1])  # json.dumps writes the lone surrogate as the escape "\ud800"
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"conversations": convs, "image_bytes": [image] * 3}), path)
    ds = ParquetVLMDataset(path, tokenizer=tok, run_length=4, image_size=32, max_length=128)
    for row, reason in [(1, "invalid text"), (2, "nested too deeply")]:
        with pytest.raises(DataError, match=f"^{path}: row {row}: {reason}: "):
            ds[row]


@pytest.mark.parametrize("bad, reason", [(SURROGATE, "invalid text"), (DEEP, "nested too deeply")],
                         ids=["surrogate", "deep"])
def test_training_stops_on_bad_text_with_one_line_or_skips_it(shapes_dir, shapes_tokenizer_path, tmp_path, capsys,
                                                              bad, reason):
    path = jsonl_with(shapes_dir, tmp_path, bad, at=3)
    order = "--no-group-by-length"  # seed 0's plain shuffle puts line 3 in the one step taken
    assert train.main("pretrain", train_args(path, shapes_tokenizer_path, tmp_path / "a", order)) == 2
    assert one_error_line(capsys.readouterr().out).startswith(f"error: {path}:3: {reason}: ")
    assert train.main("pretrain", train_args(path, shapes_tokenizer_path, tmp_path / "b", order, "--skip-bad")) == 0
    assert f"(1 {reason})" in capsys.readouterr().out


@pytest.mark.parametrize("bad, reason", [(SURROGATE, "invalid text"), (DEEP, "nested too deeply"),
                                         (b"\xff\xfe not UTF-8", "invalid JSON: not UTF-8")],
                         ids=["surrogate", "deep", "not_utf8"])
def test_tokenizer_training_names_the_bad_line(shapes_dir, tmp_path, capsys, bad, reason):
    path = jsonl_with(shapes_dir, tmp_path, "PLACEHOLDER", at=2)
    if isinstance(bad, bytes):
        path.write_bytes(path.read_bytes().replace(b"PLACEHOLDER", bad))
    else:
        path.write_text(path.read_text().replace("PLACEHOLDER", bad))
    assert tokenizer_main(["train", "--data", str(path), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and one_error_line(err).startswith(f"error: {path}:2: {reason}"), err


@pytest.mark.parametrize("bad", [SURROGATE, DEEP, b"\xff\xfe not UTF-8"], ids=["surrogate", "deep", "not_utf8"])
def test_data_stats_and_preview_count_bad_text_as_malformed(shapes_dir, tmp_path, capsys, bad):
    path = jsonl_with(shapes_dir, tmp_path, "PLACEHOLDER", at=2)
    if isinstance(bad, bytes):
        path.write_bytes(path.read_bytes().replace(b"PLACEHOLDER", bad))
    else:
        path.write_text(path.read_text().replace("PLACEHOLDER", bad))
    assert data_main(["stats", str(path)]) == 0
    assert f"{path}: 8 rows (+ 1 malformed)" in capsys.readouterr().out
    assert data_main(["preview", str(path), "--out", str(tmp_path / "grid.png"), "-n", "3"]) == 0
    assert f" 2. [malformed] {path}:2" in capsys.readouterr().out


@pytest.mark.parametrize("bad, reason", [(SURROGATE, "invalid text"), (DEEP, "nested too deeply")],
                         ids=["surrogate", "deep"])
def test_eval_file_with_bad_text_is_one_line(ckpt, shapes_dir, tmp_path, capsys, bad, reason):
    line = json.loads((shapes_dir / "test_sft.jsonl").read_text().splitlines()[0])
    line["image"] = str(shapes_dir / line["image"])
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps(line) + "\n" + bad + "\n")
    assert eval_main(["--weights", ckpt, "--eval", str(q), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and one_error_line(err).startswith(f"error: {q}:2: {reason}"), err


# ---------------------------------------------------------------------------------------------
# 6: invalid Unicode typed by a user


def test_a_prompt_that_is_not_unicode_is_one_line(ckpt, shapes_dir, capsys):
    img = str(sorted((shapes_dir / "images").glob("test_*.png"))[0])
    # Python decodes a command-line byte that is not UTF-8 to a lone surrogate ("\udcff" for 0xff)
    for prompt, culprit in [("What is \ud800?", "lone surrogate U+D800"), ("What \udcff?", "byte 0xff")]:
        assert eval_main(["--weights", ckpt, "--images", img, "--prompt", prompt, "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and culprit in one_error_line(err), err


def test_chat_refuses_a_line_that_is_not_utf8_and_goes_on(ckpt, shapes_dir, capsys, monkeypatch):
    img = str(sorted((shapes_dir / "images").glob("test_*.png"))[0])
    stdin = io.TextIOWrapper(io.BytesIO(b"How many shapes?\nWhat \xff\xfe is it?\nWhat colour?\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)  # strict UTF-8, like a terminal's
    assert eval_main(["--weights", ckpt, "--images", img, "--chat", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("vlm> ") == 2 and "byte 0xff at character 5 is not UTF-8; ask again" in out


def test_a_question_that_is_not_unicode_is_a_prompt_error():
    from minivlm.data.prompt import PromptError, user_turn
    with pytest.raises(PromptError, match="invalid text: lone surrogate U[+]DC00"):
        user_turn("what \udc00", 1)


# ---------------------------------------------------------------------------------------------
# 8: a damaged parquet row group is one meaningful line, also from DataLoader workers


def damaged_parquet(shapes_dir, path):
    """A shapes parquet whose second row group's conversations page header is overwritten: the footer
    reads fine, reading that row group fails with pyarrow's two-line message."""
    rows = [json.loads(line) for line in (shapes_dir / "pretrain.jsonl").read_text().splitlines()[:12]]
    table = pa.table({"conversations": [json.dumps(r["conversations"]) for r in rows],
                      "image_bytes": [(shapes_dir / r["image"]).read_bytes() for r in rows]})
    pq.write_table(table, path, row_group_size=4)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match="\n"):  # the damage this test is about: a message of several lines
        pq.ParquetFile(path).read_row_group(1)
    return path


def test_a_damaged_row_group_is_one_line_from_workers(shapes_dir, shapes_tokenizer_path, tmp_path, capsys):
    path = damaged_parquet(shapes_dir, tmp_path / "damaged.parquet")
    # ungrouped, the damage is met by a DataLoader worker, mid-epoch
    args = train_args(path, shapes_tokenizer_path, tmp_path / "o", "--num-workers", "2", "--max-steps", "3")
    assert train.main("pretrain", args + ["--no-group-by-length"]) == 2
    line = one_error_line(capsys.readouterr().out)
    assert line.startswith(f"error: {path}: row ") and "bad row: row group 1 is unreadable (OSError: " in line, line
    assert "Deserializing page header failed" in line and line.endswith(")"), line
    # length grouping (the default) reads the text column before the first step: met there, one line too
    assert train.main("pretrain", args) == 2
    line = one_error_line(capsys.readouterr().out)
    assert line.startswith(f"error: {path}: bad row: ") and "Deserializing page header failed" in line, line


def test_a_damaged_row_group_is_one_line_in_data_stats(shapes_dir, tmp_path, capsys):
    path = damaged_parquet(shapes_dir, tmp_path / "damaged.parquet")
    assert data_main(["stats", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert one_error_line(err).startswith(f"error: {path}: bad row: rows from 0 on are unreadable (OSError: "), err


# ---------------------------------------------------------------------------------------------
# 10: flags out of range are one line and exit code 2


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "-1"), ("--dropout", "2"), ("--dropout", "nan"),
                                         ("--num-workers", "-1"), ("--min-lr-ratio", "nan"),
                                         ("--min-lr-ratio", "5"), ("--warmup-steps", "-5")])
def test_training_flags_out_of_range_are_one_line(shapes_dir, shapes_tokenizer_path, tmp_path, capsys, flag, value):
    args = train_args(shapes_dir / "pretrain.jsonl", shapes_tokenizer_path, tmp_path / "o", flag, value)
    assert train.main("pretrain", args) == 2
    assert one_error_line(capsys.readouterr().out).startswith(f"error: {flag} ")
    assert not (tmp_path / "o").exists()  # refused before anything was built or written


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "0"), ("--max-new-tokens", "-1"),
                                         ("--temperature", "nan"), ("--temperature", "-1"), ("--top-p", "2"),
                                         ("--batch-size", "0"), ("--device", "cuda")])
def test_eval_flags_out_of_range_are_one_line(ckpt, shapes_dir, capsys, flag, value):
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    img = str(sorted((shapes_dir / "images").glob("test_*.png"))[0])
    try:
        code = eval_main(["--weights", ckpt, "--images", img, "--max-new-tokens", "2", flag, value])
    except SystemExit as e:  # argparse: the usage, then one error line naming the flag
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert f"argument {flag}" in last if flag != "--device" else last.startswith("error: --device cuda"), err


# ---------------------------------------------------------------------------------------------
# 11: preview's pixel limit, one BOM rule, 16-bit greyscale without a float64 copy


def test_preview_refuses_an_image_training_refuses(shapes_dir, tmp_path, capsys, monkeypatch):
    path = jsonl_with(shapes_dir, tmp_path, (shapes_dir / "pretrain.jsonl").read_text().splitlines()[0], at=1)
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 95 * 95)  # the shapes' 96 x 96 images are "too large"
    assert data_main(["preview", str(path), "--out", str(tmp_path / "grid.png"), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert f" 1. [unreadable image] {path}:1: " in out and "MAX_IMAGE_PIXELS" in out, out
    good = json.loads((shapes_dir / "pretrain.jsonl").read_text().splitlines()[0])
    pq.write_table(pa.table({"conversations": [json.dumps(good["conversations"])],
                             "image_bytes": [(shapes_dir / good["image"]).read_bytes()]}), tmp_path / "one.parquet")
    assert data_main(["preview", str(tmp_path / "one.parquet"), "--out", str(tmp_path / "g2.png"), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert " 1. [unreadable image] " in out and "MAX_IMAGE_PIXELS" in out, out


def test_a_bom_at_the_start_of_a_jsonl_is_skipped_by_every_reader(ckpt, shapes_dir, tok, tmp_path, capsys):
    plain = jsonl_with(shapes_dir, tmp_path, None, name="plain.jsonl", source="test_sft.jsonl")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    # training
    a, b = (VLMDataset(p, tokenizer=tok, run_length=4, image_size=32) for p in (plain, bom))
    assert len(a) == len(b) == 8 and torch.equal(a[0]["input_ids"], b[0]["input_ids"])
    # data stats
    assert data_main(["stats", str(bom)]) == 0
    assert f"{bom}: 8 rows\n" in capsys.readouterr().out
    # --eval
    assert eval_main(["--weights", ckpt, "--eval", str(bom), "--max-new-tokens", "2", "--limit", "1"]) == 0
    assert "overall" in capsys.readouterr().out
    # anywhere else a BOM is not JSON, for every reader alike
    second = tmp_path / "second.jsonl"
    second.write_bytes(plain.read_bytes().replace(b"\n{", b"\n\xef\xbb\xbf{", 1))
    with pytest.raises(DataError, match="invalid JSON: Unexpected UTF-8 BOM"):
        VLMDataset(second, tokenizer=tok, run_length=4, image_size=32)[1]
    assert data_main(["stats", str(second)]) == 0
    assert "(+ 1 malformed)" in capsys.readouterr().out


def test_16_bit_grey_is_converted_without_a_float64_copy():
    a = (np.arange(2000 * 1500) % 65536).astype(np.uint16).reshape(1500, 2000)
    image = Image.fromarray(a)
    assert image.mode == "I;16"
    tracemalloc.start()
    try:
        rgb = processing.to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * a.size, f"{peak / a.size:.1f} bytes a pixel"  # the 8-bit result and a small strip
    expected = np.clip(a / 65535 * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(rgb), np.repeat(expected[..., None], 3, axis=2))
