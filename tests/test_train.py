import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from minivlm.model.checkpoint import load_vlm
from minivlm.model.config import vlm_preset
from minivlm.train.loop import main
from minivlm.train.resume import CSV_FIELDS
from minivlm.train.optim import set_trainable, trainable_counts
from minivlm.train.sampler import EpochSampler
from minivlm.model.vlm import MiniMindVLM


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_args(shapes_dir, tok, out, data="pretrain.jsonl", *extra):
    return ["--preset", "tiny", "--data", str(shapes_dir / data), "--tokenizer", str(tok), "--out", str(out),
            "--batch-size", "4", "--num-workers", "0", "--log-every", "1", "--warmup-steps", "0",
            "--max-length", "128", *extra]


def torchrun_failure(r) -> str:
    """What a failed torchrun run said: the workers' own stderr lines first (torchrun's summary comes last and
    would otherwise push a worker's one-line abort message out of the report)."""
    worker = [l for l in r.stderr.splitlines() if "torch/distributed/" not in l and not l.startswith("  ")]
    return r.stdout[-1500:] + "\n".join(worker)[:3000] + r.stderr[-1500:]


def free_port() -> str:
    """A port nobody listens on now: two test runs on one machine must not share torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_few_steps_lower_the_loss_and_log_csv(shapes_dir, shapes_tokenizer_path, tmp_path):
    out = tmp_path / "run"
    args = base_args(shapes_dir, shapes_tokenizer_path, out, "pretrain.jsonl", "--max-steps", "12", "--lr", "3e-3",
                     "--epochs", "2")
    assert main("pretrain", args) == 0
    rows = read_csv(out / "log_pretrain.csv")
    assert list(rows[0].keys()) == CSV_FIELDS
    assert len(rows) == 12
    first, last = float(rows[0]["loss"]), sum(float(r["loss"]) for r in rows[-3:]) / 3
    assert last < first - 0.5, (first, last)
    # a checkpoint in MiniMind-V layout + its JSON + the trained vision tower, loadable by load_vlm
    ckpt = out / "pretrain_vlm_128.pth"
    sd = torch.load(ckpt, weights_only=True)
    assert "vision_proj.vision_proj.0.weight" in sd and not any(k.startswith("vision_encoder") for k in sd)
    assert all(v.dtype == torch.float16 for v in sd.values())
    meta = json.loads((out / "pretrain_vlm_128.json").read_text())
    assert meta["vision_folder"] == "pretrain_vision"
    model = load_vlm(ckpt)
    state = torch.load(out / "resume_pretrain.pt", weights_only=True)["model"]
    torch.testing.assert_close(model.vision_encoder.state_dict()["vision_model.post_layernorm.weight"],
                               state["vision_encoder.vision_model.post_layernorm.weight"])

    # SFT starts from that checkpoint by default and trains on the instruction file
    assert main("sft", base_args(shapes_dir, shapes_tokenizer_path, out, "sft.jsonl", "--max-steps", "3")) == 0
    assert len(read_csv(out / "log_sft.csv")) == 3


def test_freeze_policies_train_exactly_the_intended_parameters():
    cfg = vlm_preset("tiny")
    m = MiniMindVLM(cfg)
    layer = sum(p.numel() for p in m.model.layers[0].parameters())
    proj = sum(p.numel() for p in m.vision_proj.parameters())
    lm = sum(p.numel() for p in m.model.parameters())
    post_ln = sum(p.numel() for p in m.vision_encoder.vision_model.post_layernorm.parameters())
    vision = sum(p.numel() for p in m.vision_encoder.parameters()) - post_ln  # unused by the VLM
    set_trainable(m, "pretrain", 0, False)
    assert trainable_counts(m) == {"vision": 0, "projector": proj, "lm": 0}
    set_trainable(m, "pretrain", 2, False)
    assert trainable_counts(m) == {"vision": 0, "projector": proj, "lm": 2 * layer}
    assert not m.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert m.model.layers[-1].self_attn.q_proj.weight.requires_grad
    set_trainable(m, "sft", 0, False)
    assert trainable_counts(m) == {"vision": 0, "projector": proj, "lm": lm}
    set_trainable(m, "sft", 0, True)
    assert trainable_counts(m) == {"vision": vision, "projector": proj, "lm": lm}
    # untied, the output layer is a matrix of its own outside m.model: trained with the whole decoder
    cfg.lm.tie_word_embeddings = False
    u = MiniMindVLM(cfg)
    head = u.lm_head.weight.numel()
    set_trainable(u, "pretrain", 0, False)
    assert trainable_counts(u)["lm"] == 0 and not u.lm_head.weight.requires_grad
    for stage, k in (("pretrain", -1), ("sft", 0)):
        set_trainable(u, stage, k, False)
        assert trainable_counts(u)["lm"] == lm + head and u.lm_head.weight.requires_grad


def test_resume_is_bit_identical(stop_after, shapes_dir, shapes_tokenizer_path, tmp_path):
    common = ["--max-steps", "6", "--save-every", "3", "--epochs", "3", "--lr", "2e-3"]
    a, b = tmp_path / "a", tmp_path / "b"
    # 48 samples / batch 4 = 12 steps per epoch; --grad-accum 2 makes it 6, so the run crosses no epoch
    # boundary here but does restart mid-epoch.
    assert main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, a, "pretrain.jsonl", *common,
                                      "--grad-accum", "2")) == 0
    with stop_after(3):
        assert main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, b, "pretrain.jsonl", *common,
                                          "--grad-accum", "2")) == 0
    assert torch.load(b / "resume_pretrain.pt", weights_only=True)["step"] == 3
    assert main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, b, "pretrain.jsonl", *common,
                                      "--grad-accum", "2", "--resume")) == 0
    sa = torch.load(a / "resume_pretrain.pt", weights_only=True)
    sb = torch.load(b / "resume_pretrain.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 6
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    # the log of the resumed run continues the same CSV
    assert [int(r["step"]) for r in read_csv(b / "log_pretrain.csv")] == list(range(1, 7))


def test_resume_across_an_epoch_boundary_is_bit_identical(stop_after, shapes_dir, shapes_tokenizer_path, tmp_path):
    common = ["--max-steps", "16", "--save-every", "5", "--epochs", "2", "--lr", "2e-3", "--batch-size", "6"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, a, "pretrain.jsonl", *common)) == 0
    with stop_after(10):
        assert main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, b, "pretrain.jsonl", *common)) == 0
    assert main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, b, "pretrain.jsonl", *common,
                                      "--resume")) == 0
    sa = torch.load(a / "resume_pretrain.pt", weights_only=True)["model"]
    sb = torch.load(b / "resume_pretrain.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sampler_shuffles_per_epoch_and_shards_ranks():
    s0, s1 = EpochSampler(10, seed=3, rank=0, world=2), EpochSampler(10, seed=3, rank=1, world=2)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == 5 and not set(a) & set(b) and set(a) | set(b) == set(range(10))
    s0.set_epoch(1)
    assert list(s0) != a
    s0.set_epoch(1, start=2)
    assert list(s0) == EpochSampler(10, 3, 0, 2).indices()[0:0] + _epoch(1)[2:]


def _epoch(e):
    s = EpochSampler(10, seed=3, rank=0, world=2)
    s.set_epoch(e)
    return list(s)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_missing_image_stops_or_is_skipped(shapes_dir, shapes_tokenizer_path, tmp_path, capsys, workers):
    lines = (shapes_dir / "pretrain.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["image"] = "images/does_not_exist.png"
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([lines[0], json.dumps(bad)] + lines[2:12]) + "\n")
    args = base_args(shapes_dir, shapes_tokenizer_path, tmp_path / "o", "x", "--epochs", "1",
                     "--images", str(shapes_dir))
    args[args.index("--data") + 1] = str(data)
    args[args.index("--num-workers") + 1] = workers
    assert main("pretrain", args) == 2
    err = capsys.readouterr().out.strip().splitlines()[-1]
    assert err.startswith("error: ") and "bad.jsonl:2: missing image" in err
    assert main("pretrain", args + ["--skip-bad"]) == 0


def test_non_finite_loss_stops_without_overwriting(shapes_dir, shapes_tokenizer_path, tmp_path, capsys):
    out = tmp_path / "nan"
    args = base_args(shapes_dir, shapes_tokenizer_path, out, "pretrain.jsonl", "--max-steps", "2")
    assert main("pretrain", args) == 0
    before = (out / "pretrain_vlm_128.pth").read_bytes()
    assert main("pretrain", args + ["--lr", "1e30", "--max-steps", "4", "--grad-clip", "0"]) == 1
    assert "non-finite" in capsys.readouterr().out
    assert (out / "pretrain_vlm_128.pth").read_bytes() == before


def test_torchrun_two_processes_on_cpu(shapes_dir, shapes_tokenizer_path, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           os.path.join(ROOT, "train_pretrain.py"),
           *base_args(shapes_dir, shapes_tokenizer_path, out, "pretrain.jsonl", "--max-steps", "3")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, torchrun_failure(r)
    assert "2 process(es)" in r.stdout
    assert r.stdout.count("saved ") == 1  # only rank 0 saves and logs
    assert len(read_csv(out / "log_pretrain.csv")) == 3


def test_epoch_sampler_reads_parquet_row_groups_one_after_another():
    groups = np.array([4, 3, 5])
    s0, s1 = EpochSampler(12, seed=1, rank=0, world=2, group_sizes=groups), EpochSampler(12, 1, 1, 2, groups)
    order = EpochSampler(12, seed=1, group_sizes=groups).indices()
    assert sorted(order) == list(range(12))  # a permutation of every row
    group_of = np.repeat(np.arange(3), groups)
    runs = [g for i, g in enumerate(group_of[order]) if i == 0 or g != group_of[order][i - 1]]
    assert sorted(runs) == [0, 1, 2]  # each row group is one contiguous stretch: read once
    assert sorted(s0.indices() + s1.indices()) == list(range(12))  # the ranks split it
    s0.set_epoch(1)
    assert s0.indices() != EpochSampler(12, 1, 0, 2, groups).indices()  # a new order each epoch
    s0.set_epoch(0, start=2)
    assert s0.indices() == EpochSampler(12, 1, 0, 2, groups).indices()[2:]  # resume mid-epoch


# ---------------------------------------------------------------------------------------------
# The frozen-vision feature cache (minivlm.features, train --features)


def test_fp32_feature_cache_trains_bit_for_bit_like_the_tower(shapes_dir, shapes_tokenizer_path, tmp_path, capsys):
    from minivlm.train.features import main as features_main
    from minivlm.model.vision import CLIPVisionModel
    torch.manual_seed(0)
    vision, store = tmp_path / "clip", tmp_path / "feats"
    CLIPVisionModel(vlm_preset("tiny").vision).save_pretrained(vision)
    data = str(shapes_dir / "pretrain.jsonl")
    assert features_main(["--data", data, "--vision", str(vision), "--out", str(store), "--dtype", "fp32",
                          "--batch-size", "4", "--device", "cpu"]) == 0
    run = lambda out, *extra: main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, tmp_path / out,
                                                         "pretrain.jsonl", "--vision", str(vision), "--max-steps",
                                                         "4", "--dtype", "fp32", "--device", "cpu", *extra))
    assert run("plain", "--no-train-vision") == 0
    assert run("cached", "--no-train-vision", "--features", str(store)) == 0
    a = torch.load(tmp_path / "plain" / "resume_pretrain.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cached" / "resume_pretrain.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_csv(tmp_path / "plain" / "log_pretrain.csv")] == \
           [r["loss"] for r in read_csv(tmp_path / "cached" / "log_pretrain.csv")]
    capsys.readouterr()

    # refused, one line each: a trained tower, another tower, a store whose run was killed
    assert run("r1", "--train-vision", "--features", str(store)) == 2
    assert "cannot be trained" in capsys.readouterr().out
    other = tmp_path / "clip2"
    CLIPVisionModel(vlm_preset("tiny").vision).save_pretrained(other)
    assert main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, tmp_path / "r2", "pretrain.jsonl",
                                      "--vision", str(other), "--no-train-vision", "--features", str(store))) == 2
    assert "made with vision sha256" in capsys.readouterr().out
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    assert run("r3", "--no-train-vision", "--features", str(store)) == 2
    assert "incomplete store" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# --group-by-length


def test_length_grouping_is_a_deterministic_permutation_that_cuts_padding():
    from minivlm.train.sampler import length_grouped
    lengths = torch.randint(50, 1500, (1000,), generator=torch.Generator().manual_seed(0))
    s = EpochSampler(1000, seed=3, lengths=lengths, batch_size=8)
    order = s.indices()
    assert sorted(order) == list(range(1000)) and order == EpochSampler(1000, 3, lengths=lengths, batch_size=8).indices()
    s.set_epoch(1)
    assert s.indices() != order  # reshuffled every epoch

    def padding(idx):
        batches = torch.as_tensor(idx).split(8)
        return sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in batches)

    assert padding(order) < 0.1 * padding(EpochSampler(1000, seed=3).indices())
    # two ranks: each rank's micro-batch comes from the same group of similar lengths
    r0, r1 = (EpochSampler(1000, 3, rank, 2, lengths=lengths, batch_size=4).indices() for rank in (0, 1))
    assert sorted(r0 + r1) == list(range(1000))
    assert torch.equal(length_grouped(torch.arange(10), torch.ones(10), 4, 0).sort().values, torch.arange(10))


def test_length_grouping_reads_each_parquet_row_group_once():
    # parquet keeps one row group cached: a batch must not reach back into a group already left behind
    sizes = np.array([300, 120, 5, 260, 0, 3, 200])  # small and empty groups too
    n = int(sizes.sum())
    lengths = torch.randint(50, 1500, (n,), generator=torch.Generator().manual_seed(1))
    s = EpochSampler(n, seed=2, group_sizes=sizes, lengths=lengths, batch_size=8)
    order = s.indices()
    assert sorted(order) == list(range(n))
    group = np.searchsorted(np.cumsum(sizes), order, side="right")
    assert np.count_nonzero(np.diff(group)) == np.count_nonzero(sizes) - 1  # each group one contiguous run

    def padding(idx):
        return sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in torch.as_tensor(idx).split(8))

    assert padding(order) < 0.2 * padding(EpochSampler(n, seed=2, group_sizes=sizes).indices())


def test_several_files_with_parquet_still_read_each_row_group_once():
    from torch.utils.data import ConcatDataset
    from minivlm.train.sampler import read_groups

    class Part:  # the two things the sampler asks of a dataset
        def __init__(self, n, group_sizes=None):
            self.n, self.group_sizes = n, None if group_sizes is None else np.array(group_sizes)

        def __len__(self):
            return self.n

    parquet, jsonl = Part(700, [300, 250, 150]), Part(2100)
    assert read_groups(jsonl) is None and read_groups(ConcatDataset([jsonl, jsonl])) is None  # any order is cheap
    sizes = read_groups(ConcatDataset([parquet, jsonl, parquet]))
    assert sizes.tolist() == [300, 250, 150, 1024, 1024, 52, 300, 250, 150]
    order = EpochSampler(int(sizes.sum()), seed=1, group_sizes=sizes).indices()
    group = np.searchsorted(np.cumsum(sizes), order, side="right")
    assert np.count_nonzero(np.diff(group)) == len(sizes) - 1  # each row group (and jsonl block) read in one run
    assert sorted(order) == list(range(int(sizes.sum())))


def test_length_grouping_is_on_by_default_for_data_files_only(tmp_path):
    from minivlm.train.config import parse
    assert parse("pretrain", ["--data", "a.jsonl", "--out", str(tmp_path)]).group_by_length is True
    assert parse("pretrain", ["--data", "a.jsonl", "--no-group-by-length"]).group_by_length is False
    assert parse("pretrain", ["--preset", "tiny"]).group_by_length is False  # the shapes world: no lengths


def test_resume_with_length_grouping_is_bit_identical(stop_after, shapes_dir,
                                                      shapes_tokenizer_path, tmp_path, capsys):
    common = ["--max-steps", "12", "--save-every", "5", "--epochs", "2", "--lr", "2e-3", "--batch-size", "6",
              "--group-by-length"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, a, "sft.jsonl", *common)) == 0
    with stop_after(7):
        assert main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, b, "sft.jsonl", *common)) == 0
    capsys.readouterr()
    assert main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, b, "sft.jsonl", *common[:-1],
                                      "--no-group-by-length", "--resume")) == 2  # grouping switched off: refused
    assert "--group-by-length True -> False" in capsys.readouterr().out
    assert main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, b, "sft.jsonl", *common, "--resume")) == 0
    sa = torch.load(a / "resume_pretrain.pt", weights_only=True)["model"]
    sb = torch.load(b / "resume_pretrain.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_labelled_last_block_trains_the_same_up_to_rounding(shapes_dir, shapes_tokenizer_path, tmp_path):
    # on by default for real presets; the tiny recipe keeps it off (its shipped model predates it)
    from minivlm.train.config import parse
    assert parse("pretrain", ["--data", "a.jsonl"]).labelled_last_block is True
    assert parse("sft", ["--preset", "tiny"]).labelled_last_block is False
    losses = {}
    for flag in ("--labelled-last-block", "--no-labelled-last-block"):
        out = tmp_path / flag.strip("-")
        assert main("pretrain", base_args(shapes_dir, shapes_tokenizer_path, out, "sft.jsonl", "--max-steps", "4",
                                          "--lr", "2e-3", flag)) == 0
        losses[flag] = [float(r["loss"]) for r in read_csv(out / "log_pretrain.csv")]
    on, off = losses.values()
    assert len(on) == 4 and np.allclose(on, off, rtol=1e-4, atol=0), losses


def test_compiled_decoder_matches_eager_without_graph_breaks():
    # fullgraph=True: a graph break anywhere in the decoder would raise instead of passing slowly
    torch.manual_seed(0)
    m = MiniMindVLM(vlm_preset("tiny"))
    set_trainable(m, "sft", 0, False)
    L = m.run_length
    ids = torch.cat([torch.full((2, L), m.placeholder_id), torch.randint(3, 30, (2, 20))], 1)
    px = torch.randn(2, 1, 3, 96, 96)
    eager = m(ids, px, labels=ids)
    eager.loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    compiled = m.compile_decoder()(ids, px, labels=ids)
    compiled.loss.backward()
    torch.testing.assert_close(compiled.loss, eager.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=1e-4)
    for n, g in grads.items():
        torch.testing.assert_close(m.get_parameter(n).grad, g, atol=1e-4, rtol=1e-3, msg=n)


def test_feature_store_of_a_parquet_file_serves_the_towers_output(shapes_dir, shapes_tokenizer_path, tmp_path):
    from minivlm.data.parquet import ParquetVLMDataset
    from minivlm.train.features import FeatureStore, attach, build_store
    from minivlm.data.parquet import write_parquet
    from minivlm.data.processing import load_image, preprocess_image
    from minivlm.data.tokenizer import Tokenizer
    from minivlm.model.vision import CLIPVisionModel
    torch.manual_seed(0)
    CLIPVisionModel(vlm_preset("tiny").vision).save_pretrained(tmp_path / "clip")
    records = [json.loads(line) for line in open(shapes_dir / "pretrain.jsonl")][:6]
    pq = str(tmp_path / "d.parquet")
    write_parquet(pq, [(r["conversations"], [(shapes_dir / r["image"]).read_bytes()]) for r in records], 4)
    m = build_store([pq], None, str(tmp_path / "clip"), str(tmp_path / "feats"), "fp16", batch_size=4)
    assert m["complete"] and m["images"] == 6 and m["offsets"] == list(range(7))
    assert (tmp_path / "feats" / "features.bin").stat().st_size == 6 * 36 * 128 * 2  # tiny: 36 patches x 128
    cfg = vlm_preset("tiny")
    ds = ParquetVLMDataset(pq, tokenizer=Tokenizer.from_file(shapes_tokenizer_path), max_length=128,
                           run_length=cfg.run_length, image_size=cfg.vision.image_size)
    attach(FeatureStore(tmp_path / "feats"), ds)
    sample = ds[3]
    assert "pixel_values" not in sample and sample["image_features"].shape == (1, 36, 128)
    tower = CLIPVisionModel.from_pretrained(tmp_path / "clip").eval()
    with torch.no_grad():
        want = tower.select_features(preprocess_image(load_image(shapes_dir / records[3]["image"]), 96)[None])
    torch.testing.assert_close(sample["image_features"], want.half().float())


def test_torchrun_resume_with_dropout_across_an_epoch_boundary_is_bit_identical(shapes_dir, shapes_tokenizer_path,
                                                                                 tmp_path):
    """Two processes, dropout on, 48 samples / (4 x 2) = 6 steps per epoch: a run stopped at step 5 (resume
    state from step 4) and resumed across the epoch boundary ends with the uninterrupted run's weights."""
    common = ["--max-steps", "8", "--epochs", "2", "--save-every", "4", "--lr", "2e-3", "--dropout", "0.1"]

    def torchrun(out, *extra, stop=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
               os.path.join(ROOT, "train_pretrain.py"),
               *base_args(shapes_dir, shapes_tokenizer_path, out, "pretrain.jsonl", *common, *extra)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "MINIVLM_STOP_AFTER": str(stop or "")})
        assert r.returncode == 0, torchrun_failure(r)

    a, b = tmp_path / "a", tmp_path / "b"
    torchrun(a)
    torchrun(b, stop=5)
    torchrun(b, "--resume")
    sa = torch.load(a / "resume_pretrain.pt", weights_only=True)["model"]
    sb = torch.load(b / "resume_pretrain.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [int(r["step"]) for r in read_csv(b / "log_pretrain.csv")] == list(range(1, 9))


def test_untied_pretrain_then_sft_with_several_weighted_questions_per_image(shapes_tokenizer_path, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--preset", "tiny", "--data", "synthetic", "--tokenizer", str(shapes_tokenizer_path), "--out", str(out),
              "--batch-size", "4", "--num-workers", "0", "--max-steps", "2", "--synthetic-samples", "64"]
    assert main("pretrain", common + ["--untied-embeddings"]) == 0
    model = load_vlm(out / "pretrain_vlm_128.pth")
    assert model.config.tie_word_embeddings is False and model.lm_head.weight is not model.model.embed_tokens.weight
    sft = common + ["--questions-per-image", "3", "--qtype-weights", "exists=2,count=0"]
    assert main("sft", sft) == 0
    assert load_vlm(out / "sft_vlm_128.pth").config.tie_word_embeddings is False  # kept from the pretrain
    saved = torch.load(out / "resume_sft.pt", weights_only=True)["args"]
    assert saved["questions_per_image"] == 3 and saved["qtype_weights"] == "count=0.0,exists=2.0"
    capsys.readouterr()
    assert main("sft", common[:-4] + ["--max-steps", "3", "--synthetic-samples", "64", "--resume",
                                      "--questions-per-image", "2", "--qtype-weights", "exists=2,count=0"]) == 2
    said = capsys.readouterr()
    assert "--questions-per-image 3 -> 2" in said.out + said.err


def test_multi_fraction_sets_the_share_of_two_image_samples(shapes_tokenizer_path):
    from minivlm.data.tokenizer import Tokenizer
    from minivlm.synthetic.training import ShapesTraining
    from minivlm.train.config import parse
    tok = Tokenizer.from_file(shapes_tokenizer_path)
    for fraction, multi in (("0.125", 100), ("0", 0), ("0.5", 400)):
        cfg = parse("sft", ["--preset", "tiny", "--data", "synthetic", "--synthetic-samples", "800",
                            "--multi-fraction", fraction])
        ds = ShapesTraining("sft", cfg, tok, vlm_preset("tiny")).dataset
        assert [len(d) for d in ds.datasets] == [800 - multi, multi]
    with pytest.raises(SystemExit):
        parse("sft", ["--preset", "tiny", "--multi-fraction", "1.5"])


def test_a_frozen_tower_over_several_epochs_runs_once_per_image(shapes_dir, shapes_tokenizer_path, tmp_path, capsys,
                                                                stop_after, monkeypatch):
    """The default road gets the cache's speed without reading the docs: OUT/feature_cache/ is built before the
    first step (fp32, so the weights are those of running the tower), reused on --resume, rebuilt when an
    image changes, and skipped (with the commands to do it by hand) when the disk is too small."""
    import hashlib
    import shutil
    from minivlm.model.vision import CLIPVisionModel
    CLIPVisionModel(vlm_preset("tiny").vision).save_pretrained(tmp_path / "clip")
    images = tmp_path / "shapes"
    shutil.copytree(shapes_dir, images)  # its own copy: one image is touched below
    common = ["--vision", str(tmp_path / "clip"), "--no-train-vision", "--max-steps", "3", "--epochs", "2",
              "--save-every", "1"]
    digest = lambda out: hashlib.sha256(open(out / "pretrain_vlm_128.pth", "rb").read()).hexdigest()
    args = lambda out, *extra: base_args(images, shapes_tokenizer_path, out, "pretrain.jsonl", *common, *extra)
    with stop_after(1):
        main("pretrain", args(tmp_path / "a"))
    assert "the frozen tower runs once per image" in capsys.readouterr().out
    assert json.load(open(tmp_path / "a" / "feature_cache" / "manifest.json"))["dtype"] == "fp32"
    assert main("pretrain", args(tmp_path / "a", "--resume")) == 0
    assert "feature cache: reusing" in capsys.readouterr().out
    assert main("pretrain", args(tmp_path / "b", "--feature-cache", "off")) == 0
    assert "feature cache" not in capsys.readouterr().out
    assert digest(tmp_path / "a") == digest(tmp_path / "b")  # the same weights, bit for bit
    first = images / json.loads(open(images / "pretrain.jsonl").readline())["image"]  # an image the run reads
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert main("pretrain", args(tmp_path / "a")) == 0  # a new run in the same folder
    assert "changed since the store was built" in capsys.readouterr().out
    for extra in (["--epochs", "1"], ["--epochs", "2", "--train-vision"]):  # nothing to gain: no cache
        assert main("pretrain", base_args(images, shapes_tokenizer_path, tmp_path / "c", "pretrain.jsonl",
                                          "--vision", str(tmp_path / "clip"), "--max-steps", "1", *extra)) == 0
        assert "feature cache" not in capsys.readouterr().out
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    assert main("pretrain", args(tmp_path / "d")) == 0
    out = capsys.readouterr().out
    assert "feature cache: skipped" in out and "python -m minivlm.features --data" in out
