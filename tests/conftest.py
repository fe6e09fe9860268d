"""Shared fixtures: a small synthetic shapes dataset written to disk, a tokenizer trained on it, a tiny run,
and `stop_after`, the training loop's "killed at step k" hook."""
import contextlib

import pytest

from minivlm.synthetic.dataset import write_dataset
from minivlm.data.tool import train_tokenizer


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    write_dataset(d, n_train=48, n_test=16, seed=0)
    return d


@pytest.fixture(scope="session")
def shapes_tokenizer_path(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([shapes_dir / "pretrain.jsonl", shapes_dir / "sft.jsonl", shapes_dir / "sft_multi.jsonl"],
                    vocab_size=600, out_dir=out)
    return out / "tokenizer.json"


@pytest.fixture(scope="session")
def tiny_run(shapes_dir, shapes_tokenizer_path, tmp_path_factory):
    """A tiny VLM trained for a few steps: a real checkpoint folder (weights, JSON, vision, tokenizer)."""
    from minivlm.train.loop import main
    out = tmp_path_factory.mktemp("run")
    args = ["--preset", "tiny", "--data", str(shapes_dir / "pretrain.jsonl"), "--tokenizer", str(shapes_tokenizer_path),
            "--out", str(out), "--batch-size", "4", "--num-workers", "0", "--max-steps", "2", "--log-every", "1"]
    assert main("pretrain", args) == 0
    return out


@pytest.fixture
def stop_after(monkeypatch):
    """stop_after(k) is a context manager: training runs inside it end after step k, as if killed there
    (the loop reads MINIVLM_STOP_AFTER)."""
    @contextlib.contextmanager
    def stop(step: int):
        with monkeypatch.context() as m:
            m.setenv("MINIVLM_STOP_AFTER", str(step))
            yield
    return stop
