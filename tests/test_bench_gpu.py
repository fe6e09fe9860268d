"""`python -m minivlm.bench gpu` runs end to end (as a CPU dry run) and its table has every row and column.

No timing is asserted: the numbers depend on the machine and on whatever else runs on it; they only
have to be there, finite and positive.
"""
import json
import math
import os
import subprocess
import sys

from minivlm.bench import gpu
from minivlm.bench import suite as bench
from minivlm.bench.flops import card_peak_tflops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ROWS = [(p, str(b), m) for p in ("pretrain", "sft") for m in ("eager", "compiled") for b in (16, 32)]


def _tables(md: str) -> list[list[list[str]]]:
    """The markdown tables of `md`, each a list of rows (header first, separator left out) of cells."""
    tables, current = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
            if not set(line) <= set("|-"):
                current.append(cells)
        else:
            current = None
    return tables


def _positive_number(cell: str) -> bool:
    try:
        x = float(cell.rstrip("%"))
    except ValueError:
        return False
    return math.isfinite(x) and x > 0


NUMBERS = ["samples/s", "tokens/s", "ms/step", "TFLOP/s", "peak MB"]


def _check_train(rows, header, compiled_measured: bool, mfu_known: bool):
    assert header == gpu.TRAIN_COLUMNS
    col = {name: i for i, name in enumerate(header)}
    seen = {(r[col["policy"]], r[col["batch"]], r[col["mode"]]) for r in rows}
    assert seen == set(TRAIN_ROWS) and len(rows) == len(TRAIN_ROWS)
    for r in rows:
        if r[col["mode"]] == "compiled" and not compiled_measured:
            assert r[col["note"]] == gpu.SKIP_NOTE
            continue
        assert all(_positive_number(r[col[c]]) for c in NUMBERS), r
        assert _positive_number(r[col["MFU"]]) if mfu_known else r[col["MFU"]] == "n/a", r
        assert r[col["note"]] == ""


def test_dry_run_writes_every_row_and_column(tmp_path, capsys):
    md, js = tmp_path / "tmp" / "gpu.md", tmp_path / "tmp" / "gpu.json"  # the folder is made on the way
    assert bench.main(["gpu", "--dry-run", "--device", "cpu", "--out", str(md), "--json", str(js)]) == 0
    text = md.read_text()
    assert text in capsys.readouterr().out  # the same table on stdout
    train, decode = _tables(text)
    _check_train(train[1:], train[0], compiled_measured=False, mfu_known=False)  # no peak known for a CPU
    assert decode[0] == gpu.DECODE_COLUMNS
    assert [r[0] for r in decode[1:]] == ["1", "1", "8"]  # batch 1 eager, then compiled
    for r in decode[1:]:
        assert all(_positive_number(c) for c in r[1:-1]), r
    assert decode[2][-1].startswith("compiled=True: ") and decode[2][-1].endswith("x eager"), decode[2]
    r = json.loads(js.read_text())
    assert r["meta"]["dry_run"] is True and r["meta"]["preset"] == "tiny" and r["meta"]["dtype"] == "fp32"
    assert len(r["train"]) == 8 and [d["batch"] for d in r["decode"]] == [1, 1, 8]
    for row in r["train"]:
        if row["mode"] == "eager":
            assert all(row[k] > 0 and math.isfinite(row[k]) for k in ("samples_per_s", "ms_per_step", "tflops",
                                                                        "peak_mem_mb", "flops_per_step"))
            assert row["mfu"] is None


def test_dry_run_can_run_the_compiled_rows(tmp_path):
    """The compiled path (compile_decoder, torch.compile with fullgraph, a recompile per policy and
    batch size) on both policies; aot_eager traces the same graphs as inductor without generating and
    compiling C++, which takes a minute per row on a small CPU. --peak-tflops gives the MFU column."""
    md = tmp_path / "gpu.md"
    assert gpu.main(["--dry-run", "--device", "cpu", "--compile-on-cpu", "--compile-backend", "aot_eager",
                     "--peak-tflops", "1", "--decode-batches", "1", "--out", str(md)]) == 0
    train, decode = _tables(md.read_text())
    _check_train(train[1:], train[0], compiled_measured=True, mfu_known=True)
    assert [r[0] for r in decode[1:]] == ["1", "1"]  # eager and compiled=True


def test_help_explains_every_flag():
    parser = gpu.build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 15
    assert all(a.help and len(a.help.split()) >= 4 for a in flags), [a.dest for a in flags if not a.help]
    # Through the suite's dispatch, as a user types it.
    r = subprocess.run([sys.executable, "-m", "minivlm.bench", "gpu", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "usage: python -m minivlm.bench gpu" in r.stdout, r.stderr
    for a in flags:
        assert a.option_strings[0] in r.stdout, a.option_strings
    assert "gpu" in bench.build_parser().format_help()  # the suite's own help points at it


def test_cards_are_recognised_by_name():
    assert card_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert card_peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert card_peak_tflops("NVIDIA H100 PCIe", "bf16") < 989.4
    assert card_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert card_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 156.0  # TF32
    assert card_peak_tflops("Tesla T4", "bf16") is None  # unknown: MFU n/a rather than a guess
    assert card_peak_tflops("NVIDIA H100 NVL", "bf16") is None


def test_a_bad_device_is_one_line():
    assert gpu.main(["--dry-run", "--device", "nonsense"]) == 2
