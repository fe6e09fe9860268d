import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from minivlm.infer.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "minivlm", "demo", "samples")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def ckpt(tiny_run):
    return str(tiny_run / "pretrain_vlm_128.pth")


def test_describes_each_image_in_a_folder(capsys, ckpt, shapes_dir):
    imgs = sorted((shapes_dir / "images").glob("test_00000*.png"))[:3]
    code, out, err = run_cli(capsys, "--weights", ckpt, "--images", *map(str, imgs), "--max-new-tokens", "5")
    assert code == 0, err
    assert out.count("vlm> ") == 3 and out.count("Describe the image.") == 3


def test_compile_gives_the_same_answers(capsys):
    # the shipped demo model on the sample images, eager and through the compiled decode step
    args = ["--images", os.path.join(SAMPLES, "shapes_1.png"), os.path.join(SAMPLES, "shapes_2.png"),
            "--prompt", "How many shapes are there?", "--max-new-tokens", "12"]
    code, eager, err = run_cli(capsys, *args)
    assert code == 0, err
    code, compiled, err = run_cli(capsys, *args, "--compile")
    assert code == 0, err
    assert compiled == eager and eager.count("vlm> ") == 2, eager
    assert all(line.split("vlm> ")[1].strip() for line in eager.splitlines() if "vlm> " in line), eager  # real answers


def test_multi_puts_all_images_in_one_prompt(capsys, ckpt, shapes_dir):
    imgs = sorted((shapes_dir / "images").glob("test_00000*.png"))[:2]
    code, out, err = run_cli(capsys, "--weights", ckpt, "--images", *map(str, imgs), "--multi",
                             "--prompt", "What does the first image have that the second does not?",
                             "--max-new-tokens", "4")
    assert code == 0, err
    assert out.count("vlm> ") == 1 and ", " in out.splitlines()[1]


def test_eval_scores_a_question_file(capsys, ckpt, shapes_dir):
    code, out, err = run_cli(capsys, "--weights", ckpt, "--eval", str(shapes_dir / "test_sft.jsonl"), "--limit", "20")
    assert code == 0, err
    assert "overall" in out and "colour" in out and "1 obj" in out


def test_chat_reads_turns_from_stdin(ckpt, shapes_dir):
    img = sorted((shapes_dir / "images").glob("test_*.png"))[0]
    r = subprocess.run([sys.executable, "eval_vlm.py", "--weights", ckpt, "--images", str(img), "--chat",
                        "--max-new-tokens", "3"], input="How many shapes are there?\nAnd the colour?\n\n",
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("vlm> ") == 2


def test_one_broken_image_is_reported_and_the_rest_still_run(capsys, ckpt, shapes_dir, tmp_path):
    good = sorted((shapes_dir / "images").glob("test_*.png"))[0]
    shutil.copy(good, tmp_path / "a_good.png")
    (tmp_path / "b_broken.png").write_bytes(b"\x89PNG not really")
    code, out, err = run_cli(capsys, "--weights", ckpt, "--images", str(tmp_path), "--max-new-tokens", "2")
    assert code == 0
    assert "b_broken.png" in err and out.count("vlm> ") == 1


@pytest.mark.parametrize("case", ["missing_image", "empty_folder", "only_corrupt", "missing_weights",
                                  "wrong_keys", "bad_tokenizer", "missing_eval"])
def test_bad_input_is_one_line_and_exit_code_2(capsys, ckpt, tiny_run, tmp_path, case):
    args = ["--weights", ckpt, "--max-new-tokens", "2"]
    if case == "missing_image":
        args += ["--images", str(tmp_path / "nope.jpg")]
        culprit = "nope.jpg"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args += ["--images", str(tmp_path / "empty")]
        culprit = "empty"
    elif case == "only_corrupt":
        (tmp_path / "x.png").write_bytes(b"garbage")
        args += ["--images", str(tmp_path / "x.png")]
        culprit = "x.png"
    elif case == "missing_weights":
        args[1] = str(tmp_path / "none.pth")
        culprit = "none.pth"
    elif case == "wrong_keys":
        sd = torch.load(ckpt, weights_only=True)
        sd["model.layers.0.mlp.gate_proj.weight"] = sd["model.layers.0.mlp.gate_proj.weight"][:5]
        torch.save(sd, tmp_path / "w.pth")
        meta = json.loads((tiny_run / "pretrain_vlm_128.json").read_text())
        meta.pop("sha256")  # a JSON that vouches for no hashes (older saves): the key check must name the culprit
        (tmp_path / "w.json").write_text(json.dumps(meta))
        args[1] = str(tmp_path / "w.pth")
        args += ["--tokenizer", str(tiny_run / "tokenizer.json"), "--vision", str(tiny_run / "pretrain_vision")]
        culprit = "model.layers.0.mlp.gate_proj.weight"
    elif case == "bad_tokenizer":
        tok = json.loads((tiny_run / "tokenizer.json").read_text())
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|im_end|>"]
        (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
        args += ["--tokenizer", str(tmp_path / "tokenizer.json")]
        culprit = "<|im_end|>"
    elif case == "missing_eval":
        args += ["--eval", str(tmp_path / "q.jsonl")]
        culprit = "q.jsonl"
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], err
    assert "Traceback" not in err


def test_question_first_puts_the_image_after_the_prompt(capsys, ckpt, shapes_dir):
    img = sorted((shapes_dir / "images").glob("test_*.png"))[0]
    code, out, err = run_cli(capsys, "--weights", ckpt, "--images", str(img), "--question-first",
                             "--prompt", "How many shapes are there?", "--max-new-tokens", "2")
    assert code == 0, err


def test_user_turn_places_images():
    from minivlm.data.prompt import PromptError, user_turn
    assert user_turn("Q?", 2) == "<image>\n<image>\nQ?"
    assert user_turn("Q?", 2, question_first=True) == "Q?\n<image>\n<image>"
    assert user_turn("Q?", 0, question_first=True) == "Q?"
    # markers already in the question stay where they are, and their number must match
    assert user_turn("Q?\n<image>", 1) == "Q?\n<image>"
    with pytest.raises(PromptError, match="2 <image> marker"):
        user_turn("<image> <image> Q?", 1)


def test_out_of_the_box_demo_answers_about_the_samples():
    """`python eval_vlm.py` with no arguments: the shipped demo model on the shipped samples."""
    r = subprocess.run([sys.executable, "eval_vlm.py"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("vlm> ") == 7
    # the ground truth of shapes_1.png is in minivlm/demo/samples/LICENSES.md
    answer = r.stdout.split("[shapes_1.png] Describe the image.\nvlm> ")[1].splitlines()[0]
    assert answer == "a small white circle on the right"
    assert r.stdout.count("note: the demo model knows only the synthetic shapes world") == 1  # the photos
    shapes_only = subprocess.run([sys.executable, "eval_vlm.py", "--images", os.path.join(SAMPLES, "shapes_1.png"),
                                  "--max-new-tokens", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert shapes_only.returncode == 0 and "note:" not in shapes_only.stdout
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ROOT, "minivlm", "demo", "model"))
               for f in fs)
    assert size < 15e6


def test_a_reader_that_stops_early_is_not_an_error():
    """`python eval_vlm.py | head -1`: the closed pipe ends the run quietly, with no traceback."""
    p = subprocess.Popen([sys.executable, "eval_vlm.py", "--max-new-tokens", "4"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().startswith(b"model: ")
    p.stdout.close()  # what head does after its lines
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert "Traceback" not in err


def test_compile_without_a_cpp_compiler_is_one_line(capsys, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code, out, err = run_cli(capsys, "--images", os.path.join(SAMPLES, "shapes_1.png"), "--compile", "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "needs a C++ compiler" in err, (out, err)
