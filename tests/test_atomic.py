"""Every file minivlm writes is all or nothing: a checkpoint is one unit (a kill anywhere inside a save
leaves the previous save or the new one loadable, and --resume ends bit-identical), repack never empties
its input, and a full disk is one line that leaves the old file whole."""
import contextlib
import csv
import errno
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import minivlm.train.loop as train
import minivlm.train.resume as resume
from minivlm.data.parquet import write_parquet
from minivlm.data.tool import main as data_main, tokenizer_main
from minivlm.lab import grow
from minivlm.model.checkpoint import load_vlm, save_vlm
from minivlm.model.config import LMConfig, VisionConfig, VLMConfig
from minivlm.model.vlm import MiniMindVLM


class Killed(BaseException):
    """The process dying at this instant (a BaseException: no `except Exception` of the code catches it)."""


# The instants a save can be killed at: inside each file's write (fsync: the bytes are written, the
# file not yet renamed), at each rename and link, and at each removal of a folder.
EVENTS = [(os, "fsync"), (os, "replace"), (os, "link"), (shutil, "rmtree")]


@contextlib.contextmanager
def kill_at(n: int | None, when=lambda: True):
    """Count the events above (while `when()`), and raise Killed at the n-th (never, with None).
    Yields the list of events seen, e.g. ['fsync', 'replace', ...]."""
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        for module, name in EVENTS:
            def wrapped(*a, _real=getattr(module, name), _name=name, **kw):
                if when():
                    seen.append(_name)
                    if len(seen) == n:
                        raise Killed(_name)
                return _real(*a, **kw)
            mp.setattr(module, name, wrapped)
        yield seen


def small_vlm(seed: int) -> MiniMindVLM:
    torch.manual_seed(seed)
    lm = LMConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128)
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=16)
    return MiniMindVLM(VLMConfig(lm=lm, vision=vision))


def fingerprint(model) -> tuple:
    """(decoder embedding, vision patch embedding) as saved: fp16 decoder, fp32 tower."""
    sd = model.state_dict()
    return (sd["model.embed_tokens.weight"].half(),
            sd["vision_encoder.vision_model.embeddings.patch_embedding.weight"].float())


def same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x.half() if i == 0 else x, y) for i, (x, y) in enumerate(zip(a, b)))


def save(model, folder, step):
    save_vlm(model, folder / "x_vlm.pth", vision_folder=folder / "x_vision", step=step)


def leftovers(folder):
    return [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".saving")]


def test_a_save_killed_anywhere_leaves_one_loadable_save(tmp_path):
    """Kill the second save at every instant: the JSON and the files it vouches for stay one save (the
    old one until the switch, the new one after), x_vlm.pth stays a whole MiniMind-V file, and the next
    save completes cleanly."""
    old, new, third = small_vlm(0), small_vlm(1), small_vlm(2)
    base = tmp_path / "base"
    save(old, base, 1)
    with kill_at(None) as seen:
        save(new, tmp_path / "count", 1)  # (a first save into an empty folder: the same instants)
    assert len(seen) > 10, seen
    switched = False
    for n in range(1, len(seen) + 1):
        folder = shutil.copytree(base, tmp_path / f"k{n}")
        with pytest.raises(Killed), kill_at(n):
            save(new, folder, 2)
        loaded = load_vlm(folder / "x_vlm.pth")  # never "not the file saved with": a consistent set
        step = json.loads((folder / "x_vlm.json").read_text())["step"]
        is_new = same(fingerprint(loaded), fingerprint(new))
        assert is_new or same(fingerprint(loaded), fingerprint(old)), n
        assert is_new == (step == 2), (n, step)
        assert not (switched and not is_new), f"kill {n} ({seen[n - 1]}): back to the old save"
        switched = is_new
        usual = torch.load(folder / "x_vlm.pth", weights_only=True)  # MiniMind-V's file: always whole
        assert any(torch.equal(usual["model.embed_tokens.weight"], f[0]) for f in (fingerprint(old), fingerprint(new)))
        save(third, folder, 3)  # the next save finishes or discards what the kill left
        assert same(fingerprint(load_vlm(folder / "x_vlm.pth")), fingerprint(third))
        assert "staged" not in json.loads((folder / "x_vlm.json").read_text())
        assert not leftovers(folder), (n, leftovers(folder))
    assert switched


KILLED_SAVE = """
import os, shutil, sys, torch
sys.path.insert(0, {tests!r})
from test_atomic import EVENTS, save, small_vlm
n, seen = {n}, []
for module, name in EVENTS:
    def wrapped(*a, _real=getattr(module, name), **kw):
        seen.append(1)
        if len(seen) == n:
            os._exit(9)  # a real kill: no cleanup, temporary files stay where they are
        return _real(*a, **kw)
    setattr(module, name, wrapped)
save(small_vlm(1), __import__("pathlib").Path({folder!r}), 2)
"""


def test_a_process_killed_inside_a_save_leaves_one_loadable_save(tmp_path):
    """As above, with the save in a process that really dies (os._exit) at a few instants, leaving its
    temporary files behind."""
    old, new = small_vlm(0), small_vlm(1)
    base = tmp_path / "base"
    save(old, base, 1)
    # Killed just before: the staged .pth's rename, the switch (the JSON's rename), the .pth's rename to its
    # usual name, the link of the tower's weights.
    for n in (3, 9, 11, 14):
        folder = shutil.copytree(base, tmp_path / f"k{n}")
        code = KILLED_SAVE.format(tests=os.path.dirname(__file__), n=n, folder=str(folder))
        assert subprocess.run([sys.executable, "-c", code]).returncode == 9
        loaded = fingerprint(load_vlm(folder / "x_vlm.pth"))
        assert same(loaded, fingerprint(new) if n > 9 else fingerprint(old)), n
        save(small_vlm(2), folder, 3)
        assert same(fingerprint(load_vlm(folder / "x_vlm.pth")), fingerprint(small_vlm(2)))


def test_a_file_replaced_after_the_save_is_still_refused(tmp_path):
    save(small_vlm(0), tmp_path, 1)
    vision = tmp_path / "x_vision" / "model.safetensors"
    data = bytearray(vision.read_bytes())
    data[-1] ^= 1
    vision.write_bytes(bytes(data))
    from minivlm.model.weights import WeightsError
    with pytest.raises(WeightsError, match=r"model\.safetensors: not the file saved with .*x_vlm\.json \(step 1\)"):
        load_vlm(tmp_path / "x_vlm.pth")


def test_a_json_naming_another_staging_folder_is_refused_and_that_folder_kept(tmp_path):
    save(small_vlm(0), tmp_path / "ckpt", 1)
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "x_vlm.pth").write_bytes(b"not ours")
    meta_path = tmp_path / "ckpt" / "x_vlm.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "staged": "../precious"}))
    from minivlm.model.weights import WeightsError
    with pytest.raises(WeightsError, match="field staged"):
        load_vlm(tmp_path / "ckpt" / "x_vlm.pth")
    save(small_vlm(1), tmp_path / "ckpt", 2)  # a damaged JSON is replaced, and what it named is left alone
    assert (keep / "x_vlm.pth").read_bytes() == b"not ours"
    assert same(fingerprint(load_vlm(tmp_path / "ckpt" / "x_vlm.pth")), fingerprint(small_vlm(1)))


# ---------------------------------------------------------------------------------------------
# Training: a kill inside a save, then --resume


def train_args(shapes_dir, tok, out, *extra):
    return ["--preset", "tiny", "--data", str(shapes_dir / "pretrain.jsonl"), "--tokenizer", str(tok),
            "--out", str(out), "--batch-size", "4", "--num-workers", "0", "--warmup-steps", "0",
            "--max-length", "128", "--max-steps", "4", "--save-every", "2", "--lr", "2e-3", "--dropout", "0.1",
            "--log-every", "1", *extra]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_training_killed_inside_a_save_resumes_bit_identical(stop_after, shapes_dir, shapes_tokenizer_path, tmp_path):
    """The save at step 4 is killed: inside the weights' write, between the vision tower's two files (after
    the switch), inside the resume state's write. The checkpoint still loads (step 2 or 4), and --resume
    ends with exactly the weights of a run never killed."""
    a, base = tmp_path / "a", tmp_path / "base"
    assert train.main("pretrain", train_args(shapes_dir, shapes_tokenizer_path, a)) == 0
    want = torch.load(a / "resume_pretrain.pt", weights_only=True)["model"]
    want_ckpt = torch.load(a / "pretrain_vlm_128.pth", weights_only=True)
    with stop_after(2):
        assert train.main("pretrain", train_args(shapes_dir, shapes_tokenizer_path, base)) == 0
    in_second_save = {"on": False}
    real_write_save = resume.write_save

    def write_save(sv, model, optimizer, scaler, step, *rest):
        in_second_save["on"] = step == 4
        try:
            return real_write_save(sv, model, optimizer, scaler, step, *rest)
        finally:
            in_second_save["on"] = False

    # 2: the staged .pth's fsync; 14: the tower's config.json is linked to its usual name, its weights not
    # yet (the JSON switched at 9); 19: the resume state's fsync (the checkpoint is complete).
    for n in (2, 14, 19):
        b = shutil.copytree(base, tmp_path / f"b{n}")
        args = train_args(shapes_dir, shapes_tokenizer_path, b, "--resume")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(resume, "write_save", write_save)
            with pytest.raises(Killed), kill_at(n, when=lambda: in_second_save["on"]):
                train.main("pretrain", args)
        step = json.loads((b / "pretrain_vlm_128.json").read_text())["step"]
        assert step == (2 if n < 9 else 4), (n, step)
        load_vlm(b / "pretrain_vlm_128.pth")  # the checkpoint the JSON vouches for loads
        assert train.main("pretrain", args) == 0
        got = torch.load(b / "resume_pretrain.pt", weights_only=True)["model"]
        assert all(torch.equal(want[k], got[k]) for k in want), n
        ckpt = torch.load(b / "pretrain_vlm_128.pth", weights_only=True)
        assert all(torch.equal(want_ckpt[k], ckpt[k]) for k in want_ckpt), n
        assert [int(r["step"]) for r in read_csv(b / "log_pretrain.csv")] == [1, 2, 3, 4]
        assert not leftovers(b), leftovers(b)


def test_each_log_row_says_how_many_steps_its_loss_averages(stop_after, shapes_dir, shapes_tokenizer_path, tmp_path):
    """Killed after step 3 with a save at 2 and rows every 3 steps: the resumed run's row at step 3 averages
    step 3 only, and says so; every row's loss is the mean of the losses of the steps it covers."""
    every = tmp_path / "every"  # the loss of each step
    assert train.main("pretrain", train_args(shapes_dir, shapes_tokenizer_path, every, "--max-steps", "6")) == 0
    per_step = {int(r["step"]): float(r["loss"]) for r in read_csv(every / "log_pretrain.csv")}
    b = tmp_path / "b"
    args = train_args(shapes_dir, shapes_tokenizer_path, b, "--max-steps", "6", "--log-every", "3")
    with stop_after(3):
        assert train.main("pretrain", args) == 0
    assert [(int(r["step"]), int(r["steps"])) for r in read_csv(b / "log_pretrain.csv")] == [(3, 3)]
    assert train.main("pretrain", args + ["--resume"]) == 0
    rows = read_csv(b / "log_pretrain.csv")
    assert [(int(r["step"]), int(r["steps"])) for r in rows] == [(3, 1), (6, 3)]
    for r in rows:
        end, k = int(r["step"]), int(r["steps"])
        mean = sum(per_step[s] for s in range(end - k + 1, end + 1)) / k
        assert float(r["loss"]) == pytest.approx(mean, abs=2e-4), (r, mean)


def enospc_on(suffix):
    """os.replace that fails as a full disk would, for files ending in `suffix`."""
    real = os.replace

    def replace(src, dst, *a, **kw):
        if os.fspath(dst).endswith(suffix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(src))
        return real(src, dst, *a, **kw)
    return replace


def test_a_full_disk_while_training_saves_is_one_line(shapes_dir, shapes_tokenizer_path, tmp_path, capsys,
                                                      monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setattr(os, "replace", enospc_on("resume_pretrain.pt"))
    assert train.main("pretrain", train_args(shapes_dir, shapes_tokenizer_path, out, "--max-steps", "2")) == 2
    text = capsys.readouterr().out
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: cannot write ") and "resume_pretrain.pt: No space left on device" in last, last
    assert ".tmp" not in last


# ---------------------------------------------------------------------------------------------
# repack, the tokenizer, grow


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def parquet_file(tmp_path):
    turns = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A red square."}]
    path = tmp_path / "v.parquet"
    write_parquet(path, [(turns, [png()])] * 10, row_group_size=10)
    return path


def test_repack_refuses_to_write_over_its_input(parquet_file, tmp_path, capsys):
    before = parquet_file.read_bytes()
    link = tmp_path / "link.parquet"
    link.symlink_to(parquet_file)
    other_spelling = tmp_path / "sub" / ".." / "v.parquet"
    (tmp_path / "sub").mkdir()
    for out in (parquet_file, link, other_spelling):
        assert data_main(["repack", str(parquet_file), "--out", str(out), "--rows", "3"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "is the input file" in err, err
        assert parquet_file.read_bytes() == before
    assert data_main(["repack", str(link), "--out", str(tmp_path / "ok.parquet"), "--rows", "3"]) == 0
    import pyarrow.parquet as pq
    assert pq.ParquetFile(tmp_path / "ok.parquet").metadata.num_row_groups == 4


def test_repack_refuses_rows_below_one_before_writing(parquet_file, tmp_path, capsys):
    for rows in ("0", "-2"):
        with pytest.raises(SystemExit) as e:
            data_main(["repack", str(parquet_file), "--out", str(tmp_path / "out.parquet"), "--rows", rows])
        assert e.value.code == 2 and "--rows" in capsys.readouterr().err
    assert not (tmp_path / "out.parquet").exists()


def test_repack_on_a_full_disk_keeps_the_old_out(parquet_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"the previous copy")
    monkeypatch.setattr(os, "replace", enospc_on("out.parquet"))
    assert data_main(["repack", str(parquet_file), "--out", str(out), "--rows", "3"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out}: No space left on device\n", err
    assert out.read_bytes() == b"the previous copy"
    assert not leftovers(tmp_path)


def test_tokenizer_train_on_a_full_disk_keeps_the_old_file(shapes_dir, tmp_path, capsys, monkeypatch):
    data = str(shapes_dir / "pretrain.jsonl")
    assert tokenizer_main(["train", "--data", data, "--vocab-size", "300", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "tokenizer.json").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(os, "replace", enospc_on("tokenizer.json"))
    assert tokenizer_main(["train", "--data", data, "--vocab-size", "400", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'tokenizer.json'}: No space left on device\n", err
    assert (tmp_path / "tokenizer.json").read_bytes() == before
    assert not leftovers(tmp_path)


def test_grow_into_the_folder_of_its_weights_is_refused(tmp_path, capsys):
    from minivlm.infer.cli import DEMO_WEIGHTS
    model = shutil.copytree(os.path.dirname(DEMO_WEIGHTS), tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    weights = str(model / os.path.basename(DEMO_WEIGHTS))
    for out in (model, tmp_path / "model" / "sft_vision" / ".."):
        assert grow.main(["--weights", weights, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is the folder of --weights" in err, err
    assert {p.name: p.read_bytes() for p in model.rglob("*") if p.is_file()} == before


def test_a_feature_store_rebuild_on_a_full_disk_keeps_the_old_store(shapes_dir, tmp_path, capsys, monkeypatch):
    """The features are streamed to a temporary file; a failed rebuild leaves the old store whole and usable."""
    from minivlm.model.config import vlm_preset
    from minivlm.model.vision import CLIPVisionModel
    from minivlm.train import features
    CLIPVisionModel(vlm_preset("tiny").vision).save_pretrained(tmp_path / "clip")
    store = tmp_path / "feats"
    argv = ["--data", str(shapes_dir / "pretrain.jsonl"), "--vision", str(tmp_path / "clip"), "--out", str(store),
            "--dtype", "fp32", "--device", "cpu"]
    assert features.main(argv) == 0
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    capsys.readouterr()

    def full_disk(f, *args, **kwargs):
        f.write(b"half a store")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(features, "write_features", full_disk)
    assert features.main(argv + ["--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {store / 'features.bin'}: No space left on device\n", err
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before  # no temporary file left either
    assert features.FeatureStore(store).manifest["dtype"] == "fp32"


def test_a_log_row_that_cannot_be_written_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    """A full disk in the middle of a row: the half written is cut back off and the run ends in one line."""
    log = tmp_path / "log_pretrain.csv"
    log.write_bytes(resume.csv_text([{"epoch": 1, "step": 20, "steps": 20, "loss": 1.5}]))
    before = log.read_bytes()

    class HalfThenFull:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):  # tell, flush, truncate: the real file's
            return getattr(self.f, name)

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(resume, "open", lambda *a, **kw: HalfThenFull(open(*a, **kw)), raising=False)
    with pytest.raises(resume.UserError, match="log_pretrain.csv: No space left on device"):
        resume.append_log(str(log), {"epoch": 1, "step": 40, "steps": 20, "loss": 1.25})
    assert log.read_bytes() == before


def test_shapes_files_and_previews_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """The generated data, its parquet form and the preview grids go through atomic_write like every other
    file minivlm writes: a full disk leaves what was there before."""
    from minivlm.data.processing import save_image
    from minivlm.synthetic.dataset import write_dataset
    write_dataset(tmp_path, n_train=4, n_test=2, seed=0)
    before = (tmp_path / "pretrain.jsonl").read_bytes()
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"the old grid")
    pq = tmp_path / "old.parquet"
    pq.write_bytes(b"the old parquet")
    for name in ("pretrain.jsonl", "grid.png", "old.parquet"):
        monkeypatch.setattr(os, "replace", enospc_on(name))
        with pytest.raises(OSError, match="No space left on device"):
            if name == "pretrain.jsonl":
                write_dataset(tmp_path, n_train=5, n_test=2, seed=1)
            elif name == "grid.png":
                save_image(Image.new("RGB", (8, 8)), grid)
            else:
                write_parquet(pq, [([{"role": "user", "content": "hi"}], [png()])])
        monkeypatch.undo()
    assert (tmp_path / "pretrain.jsonl").read_bytes() == before
    assert grid.read_bytes() == b"the old grid" and pq.read_bytes() == b"the old parquet"
    assert not leftovers(tmp_path)
