"""No input crashes, hangs, misleads or runs code; a run killed anywhere resumes exactly (issue 13)."""
import csv
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import minivlm.data.processing as processing
import minivlm.train.loop as train
from minivlm.model.checkpoint import check_tokenizer, load_vlm, sha256_of
from minivlm.infer.cli import main as eval_main
from minivlm.data.processing import ImageLoadError, center_crop, load_image, preprocess_image, resize_and_crop
from minivlm.data.processing import resize_shortest_side
from minivlm.model.weights import WeightsError


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_args(shapes_dir, tok, out, *extra):
    return ["--preset", "tiny", "--data", str(shapes_dir / "pretrain.jsonl"), "--tokenizer", str(tok),
            "--out", str(out), "--batch-size", "4", "--num-workers", "0", "--log-every", "1", "--warmup-steps", "0",
            "--max-length", "128", *extra]


def one_error_line(text):
    lines = text.strip().splitlines()
    assert "Traceback" not in text, text
    assert lines and lines[-1].startswith("error: "), text
    return lines[-1]


def png_header_only(path, w, h):
    """A PNG that claims w x h pixels: a few bytes on disk, gigabytes once decoded (a 'decompression bomb')."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1))) + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def ckpt(tiny_run):
    return str(tiny_run / "pretrain_vlm_128.pth")


@pytest.fixture()
def run_copy(tiny_run, tmp_path):
    """A private copy of the trained tiny run, to damage."""
    return shutil.copytree(tiny_run, tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# 1, 2: images


def test_oversized_image_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = png_header_only(tmp_path / "b.png", 15000, 15000)  # past Pillow's own hard limit
    with pytest.raises(ImageLoadError, match=r"b\.png: 225,000,000 pixels is more than MAX_IMAGE_PIXELS"):
        load_image(bomb)
    Image.new("L", (40, 30)).save(tmp_path / "small.png")  # our limit, below Pillow's
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match=r"small\.png: 1,200 pixels is more than MAX_IMAGE_PIXELS = 1,000"):
        load_image(tmp_path / "small.png")


def test_oversized_image_is_skipped_in_a_folder_and_in_training(capsys, ckpt, shapes_dir, shapes_tokenizer_path,
                                                                 tmp_path):
    png_header_only(tmp_path / "b.png", 15000, 15000)
    good = sorted((shapes_dir / "images").glob("test_*.png"))[0]
    assert eval_main(["--weights", ckpt, "--images", str(tmp_path / "b.png"), str(good), "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "skipped: " in captured.err and "b.png" in captured.err and captured.out.count("vlm> ") == 1

    lines = (shapes_dir / "pretrain.jsonl").read_text().splitlines()[:9]
    bad = json.loads(lines[1])
    bad["image"] = str(tmp_path / "b.png")
    data = tmp_path / "bomb.jsonl"
    data.write_text("\n".join([lines[0], json.dumps(bad)] + lines[2:]) + "\n")
    args = base_args(shapes_dir, shapes_tokenizer_path, tmp_path / "o", "--epochs", "1", "--images", str(shapes_dir))
    args[args.index("--data") + 1] = str(data)
    assert train.main("pretrain", args) == 2
    assert "pixels is more than MAX_IMAGE_PIXELS" in one_error_line(capsys.readouterr().out)
    assert train.main("pretrain", args + ["--skip-bad"]) == 0


def smooth_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1).astype(np.uint8)
    im = Image.fromarray(a)
    draw = ImageDraw.Draw(im)
    for _ in range(5):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse((x, y, x + w // 3 + 2, y + h // 5 + 2), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return im


@pytest.mark.parametrize("size", [(300, 2000), (2000, 300), (33, 333), (640, 5000), (400, 7), (5, 5000)])
def test_cropped_resize_matches_resize_then_crop(size):
    """The path for extreme aspect ratios, forced on moderate ones, against CLIP's resize-then-crop."""
    im = smooth_image(*size)
    for target in (224, 96):
        ref = np.asarray(center_crop(resize_shortest_side(im, target), target)).astype(int)
        got = np.asarray(resize_and_crop(im, target, plain_aspect=1.0)).astype(int)
        diff = np.abs(ref - got)
        assert got.shape == ref.shape
        assert diff.mean() < 0.1 and np.percentile(diff, 99) <= 1, (size, target, diff.max(), diff.mean())
    # up to 8:1 nothing changes: the plain path is CLIP's, bit for bit
    im = smooth_image(300, 2000)
    assert np.array_equal(np.asarray(resize_and_crop(im, 224, plain_aspect=8)),
                          np.asarray(center_crop(resize_shortest_side(im, 224), 224)))


def test_thin_images_are_cheap(tmp_path):
    Image.new("RGB", (1, 40000), (200, 10, 10)).save(tmp_path / "thin.png")
    x = preprocess_image(load_image(tmp_path / "thin.png"))  # the plain path would allocate ~6 GB
    assert x.shape == (3, 224, 224) and torch.isfinite(x).all()
    assert preprocess_image(Image.new("L", (40000, 1), 128)).shape == (3, 224, 224)
    assert preprocess_image(Image.new("RGB", (3, 100000)), size=96).shape == (3, 96, 96)


# ---------------------------------------------------------------------------------------------
# 3-7: resume


class Payload:
    """Unpickling this would create a file: what a malicious 'resume state' could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_state_never_runs_code_and_bad_files_are_one_line(shapes_dir, shapes_tokenizer_path, tmp_path,
                                                                 capsys):
    out = tmp_path / "o"
    out.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(str(marker))}, out / "resume_pretrain.pt")
    args = base_args(shapes_dir, shapes_tokenizer_path, out, "--max-steps", "2", "--resume")
    assert train.main("pretrain", args) == 2
    assert "resume_pretrain.pt: not a readable resume state" in one_error_line(capsys.readouterr().out)
    assert not marker.exists()

    assert train.main("pretrain", args[:-1]) == 0  # a genuine state, loadable with weights_only=True
    state = torch.load(out / "resume_pretrain.pt", weights_only=True)
    assert state["step"] == 2 and state["args"]["world"] == 1
    blob = (out / "resume_pretrain.pt").read_bytes()
    (out / "resume_pretrain.pt").write_bytes(blob[:len(blob) // 2])  # truncated
    assert train.main("pretrain", args) == 2
    assert "resume_pretrain.pt" in one_error_line(capsys.readouterr().out)


def test_resume_with_dropout_is_bit_identical_and_logs_each_step_once(stop_after, shapes_dir, shapes_tokenizer_path,
                                                                      tmp_path, capsys):
    common = ["--max-steps", "6", "--save-every", "3", "--epochs", "2", "--lr", "2e-3", "--dropout", "0.1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, a, *common)) == 0
    # killed at step 5: the resume state is from step 3, the log already has rows 4 and 5
    with stop_after(5):
        assert train.main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, b, *common)) == 0
    stale = b / "pretrain_vision" / "model.safetensors.tmp4194999"  # an atomic write cut short
    stale.write_bytes(b"half")
    assert train.main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, b, *common, "--resume")) == 0
    sa = torch.load(a / "resume_pretrain.pt", weights_only=True)["model"]
    sb = torch.load(b / "resume_pretrain.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with open(b / "log_pretrain.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    assert not stale.exists()
    assert json.loads((b / "pretrain_vlm_128.json").read_text())["vlm"]["lm"]["dropout"] == 0.1

    # the flags that decide data order and step count must not change on --resume
    capsys.readouterr()
    changed = base_args(shapes_dir, shapes_tokenizer_path, b, *common, "--resume", "--seed", "1", "--batch-size", "6")
    assert train.main("pretrain", changed) == 2
    err = one_error_line(capsys.readouterr().out)
    assert "--batch-size 4 -> 6" in err and "--seed 0 -> 1" in err and "--lr" not in err


def test_sigterm_saves_a_resume_point_and_stops(shapes_dir, shapes_tokenizer_path, tmp_path, capsys, monkeypatch):
    real_step, calls = train.train_step, []

    def step_then_signal(*a, **kw):
        real_step(*a, **kw)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run, is acted on at the step boundary

    monkeypatch.setattr(train, "train_step", step_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "o"
    assert train.main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, out, "--max-steps", "50")) == 143
    assert signal.getsignal(signal.SIGTERM) == before
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "stopped by SIGTERM after step 2/" in last and "--resume" in last
    assert torch.load(out / "resume_pretrain.pt", weights_only=True)["step"] == 2


# ---------------------------------------------------------------------------------------------
# 6, 10, 11: checkpoints that do not belong together


def test_checkpoint_parts_from_two_saves_are_refused(run_copy):
    meta = json.loads((run_copy / "pretrain_vlm_128.json").read_text())
    assert meta["step"] == 2 and set(meta["sha256"]) == {"weights", "vision"}
    load_vlm(run_copy / "pretrain_vlm_128.pth")  # intact: loads
    vision = run_copy / "pretrain_vision" / "model.safetensors"
    data = bytearray(vision.read_bytes())
    data[-1] ^= 1  # as if the tower of a later save had been written, and then the run was killed
    vision.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"model\.safetensors: not the file saved with .*step 2"):
        load_vlm(run_copy / "pretrain_vlm_128.pth")


def test_nan_weights_are_refused_naming_the_tensor(run_copy, capsys):
    pth = run_copy / "pretrain_vlm_128.pth"
    sd = torch.load(pth, weights_only=True)
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    torch.save(sd, pth)
    meta = json.loads((run_copy / "pretrain_vlm_128.json").read_text())
    meta["sha256"]["weights"] = sha256_of(pth)  # a diverged run saved it that way
    (run_copy / "pretrain_vlm_128.json").write_text(json.dumps(meta))
    assert eval_main(["--weights", str(pth), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight holds NaN" in one_error_line(err) and len(err.strip().splitlines()) == 1


def test_a_tokenizer_of_another_size_is_refused(tiny_run, shapes_tokenizer_path):
    from minivlm.data.tokenizer import Tokenizer
    tok = Tokenizer.from_file(shapes_tokenizer_path)
    meta = json.loads((tiny_run / "pretrain_vlm_128.json").read_text())
    assert meta["tokenizer_vocab_size"] == tok.vocab_size
    model = load_vlm(tiny_run / "pretrain_vlm_128.pth")

    class Smaller:  # fits in the embedding table, but is not the tokenizer the model learned
        vocab_size, placeholder_id = tok.vocab_size - 40, tok.placeholder_id

    check_tokenizer(model, Smaller, "small.json")  # nothing recorded: cannot tell
    with pytest.raises(WeightsError, match=f"small.json: tokenizer has {tok.vocab_size - 40} tokens, but the "
                                           f"checkpoint was trained with one of {tok.vocab_size}"):
        check_tokenizer(model, Smaller, "small.json", meta["tokenizer_vocab_size"])


# ---------------------------------------------------------------------------------------------
# 8, 9: plain mistakes are one line and exit code 2


@pytest.mark.parametrize("case", ["missing_data", "data_folder", "out_below_file", "missing_tokenizer", "batch_0"])
def test_training_mistakes_are_one_line(shapes_dir, shapes_tokenizer_path, tmp_path, capsys, case):
    args = base_args(shapes_dir, shapes_tokenizer_path, tmp_path / "o", "--max-steps", "1")
    culprit = {"missing_data": "nope.jsonl", "data_folder": "is a folder", "out_below_file": "cannot write there",
               "missing_tokenizer": "tokenizer not found", "batch_0": "--batch-size"}[case]
    if case == "missing_data":
        args[args.index("--data") + 1] = str(tmp_path / "nope.jsonl")
    elif case == "data_folder":
        args[args.index("--data") + 1] = str(shapes_dir)
    elif case == "out_below_file":
        (tmp_path / "file").write_text("x")
        args[args.index("--out") + 1] = str(tmp_path / "file" / "o")
    elif case == "missing_tokenizer":
        args[args.index("--tokenizer") + 1] = str(tmp_path / "none.json")
    elif case == "batch_0":
        args[args.index("--batch-size") + 1] = "0"
    try:
        code = train.main("pretrain", args)
    except SystemExit as e:  # argparse: usage + one error line
        code = e.code
    captured = capsys.readouterr()
    assert code == 2
    assert culprit in one_error_line(captured.out) if case != "batch_0" else culprit in captured.err.splitlines()[-1]


@pytest.mark.parametrize("case", ["question_number", "qtype_list", "not_utf8", "empty", "batch_0", "temperature_nan",
                                  "top_p_0", "top_k_negative", "penalty_0", "max_new_0", "cuda"])
def test_eval_mistakes_are_one_line(ckpt, shapes_dir, tmp_path, capsys, case):
    q = tmp_path / "q.jsonl"
    line = json.loads((shapes_dir / "test_sft.jsonl").read_text().splitlines()[0])
    line["image"] = str(shapes_dir / line["image"])
    args = ["--weights", ckpt, "--eval", str(q), "--max-new-tokens", "2"]
    argparse_level = case in ("batch_0", "temperature_nan", "top_p_0", "top_k_negative", "penalty_0", "max_new_0")
    if case == "question_number":
        line["conversations"][-2]["content"] = 42
    elif case == "qtype_list":
        line["qtype"] = ["colour"]
    if case == "not_utf8":
        q.write_bytes(b'{"conversations": "\xff\xfe"}\n')
    elif case == "empty":
        q.write_text("\n")
    else:
        q.write_text(json.dumps(line) + "\n")
    flag = {"batch_0": ["--batch-size", "0"], "temperature_nan": ["--temperature", "nan"], "top_p_0": ["--top-p", "0"],
            "top_k_negative": ["--top-k", "-1"], "penalty_0": ["--repetition-penalty", "0"],
            "max_new_0": ["--max-new-tokens", "0"], "cuda": ["--device", "cuda"]}.get(case, [])
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    try:
        code = eval_main(args + flag)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    if argparse_level:
        assert f"argument {flag[0]}" in last, err
    else:
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert last.startswith("error: ") and ("q.jsonl" in last or "--device cuda" in last), err


def test_chat_survives_a_typed_image_marker_and_a_closed_stdin(ckpt, shapes_dir, capsys, monkeypatch):
    img = str(sorted((shapes_dir / "images").glob("test_*.png"))[0])
    monkeypatch.setattr(sys, "stdin", io.StringIO("How many shapes?\nAnd <image> this?\nWhat colour?\n"))
    assert eval_main(["--weights", ckpt, "--images", img, "--chat", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("vlm> ") == 2 and "already in this conversation" in out
    r = subprocess.run(f"{sys.executable} eval_vlm.py --weights {ckpt} --images {img} --chat 0<&-", shell=True,
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_a_bad_sample_with_two_workers_ends_the_run_instead_of_hanging(shapes_dir, shapes_tokenizer_path, tmp_path):
    """Workers must still die of SIGTERM when the main process exits after the one-line error
    (they ignore only Ctrl-C); before, the process waited forever for them."""
    lines = (shapes_dir / "pretrain.jsonl").read_text().splitlines()
    lines[7] = "{bad json"
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "train_pretrain.py", "--preset", "tiny", "--data", str(tmp_path / "bad.jsonl"),
           "--tokenizer", str(shapes_tokenizer_path), "--out", str(tmp_path / "out"), "--num-workers", "2",
           "--images", str(shapes_dir), "--batch-size", "4", "--max-steps", "20", "--threads", "1"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "bad.jsonl:8: invalid JSON" in r.stdout + r.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_one_bad_value_in_any_float_dtype(dtype, bad):
    from minivlm.model.checkpoint import check_finite
    from minivlm.model.weights import WeightsError
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(dtype)
    check_finite(model, "ok.pth")  # all finite: no error
    with torch.no_grad():
        model[1].weight[2, 5] = bad
    with pytest.raises(WeightsError, match=r"bad\.pth: tensor 1\.weight holds NaN or infinite"):
        check_finite(model, "bad.pth")
