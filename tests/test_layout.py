"""The layout shows the architecture: packages in one direction of imports, small files, a public API.

The import graph is read from the source (every `import` statement, also inside functions), so a cycle or
an import that climbs back up a layer fails here before a reader trips over it.
"""
import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "minivlm")

# Lower layers never import higher ones; packages on one layer never import each other.
LAYERS = {"common": 0, "data": 1, "model": 2, "synthetic": 3, "train": 4, "infer": 4,
          "web": 5, "clip": 5, "recipe": 5, "lab": 6, "bench": 7}
SHIMS = {"tokenizer", "features", "grow", "probe"}  # minivlm/<name>.py: `python -m minivlm.<name>` only
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80
PUBLIC_API = ["load_vlm", "save_vlm", "MiniMindVLM", "MiniMindLM", "LMConfig", "VLMConfig", "vlm_preset",
              "CLIPVisionModel", "Tokenizer", "preprocess_image", "load_image", "render_chat", "encode_chat",
              "chat_prompt", "VLMDataset", "ParquetVLMDataset", "collate_vlm", "generate", "SamplingConfig",
              "make_optimizer", "set_trainable", "TrainConfig"]


def modules():
    """{dotted name: path} of every module of the package."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def imports_of(name, path, known):
    """The minivlm modules that module `name` imports (explicitly, at any depth of its code)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer_of(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_import_graph_has_no_cycles():
    g = {k: {t for t in v if t != "minivlm"} for k, v in graph().items()}  # the top-level API sits above all
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(g[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_imports_flow_down_the_layers():
    upward = []
    for module, targets in graph().items():
        here = layer_of(module)
        if here is None or here in SHIMS or module == "minivlm":
            continue
        for t in targets:
            there = layer_of(t)
            if there in SHIMS or there is None:
                upward.append(f"{module} -> {t}")
            elif there != here and LAYERS[there] >= LAYERS[here]:
                upward.append(f"{module} -> {t}")
    assert not upward, "\n".join(upward)


def test_ls_shows_the_pipeline():
    entries = sorted(e for e in os.listdir(PKG) if not e.startswith((".", "__pycache__")))
    packages = sorted(e for e in entries if os.path.isdir(os.path.join(PKG, e)) and e != "demo")
    assert packages == sorted(set(LAYERS) - {"common"})
    loose = sorted(e[:-3] for e in entries if e.endswith(".py") and e != "__init__.py")
    assert loose == sorted(SHIMS | {"common"})
    for name in SHIMS:  # a shim is a few lines that hand over to the module that owns the command
        source = open(os.path.join(PKG, f"{name}.py"), encoding="utf-8").read()
        assert len(source.splitlines()) <= 8 and "main" in source, name
    for package in packages:
        doc = ast.get_docstring(ast.parse(open(os.path.join(PKG, package, "__init__.py")).read()))
        assert doc and len(doc.split()) >= 10, f"minivlm/{package}/__init__.py does not say what it holds"


def test_no_module_or_function_is_too_long():
    too_long = []
    for name, path in modules().items():
        source = open(path, encoding="utf-8").read()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {n} lines")
    assert not too_long, "\n".join(too_long)


def test_the_public_api_imports_from_the_top():
    import minivlm
    missing = [n for n in PUBLIC_API if not hasattr(minivlm, n)]
    assert not missing
    assert set(PUBLIC_API) <= set(minivlm.__all__)


def test_no_code_cites_the_readme():
    """The README is a guide that gets rewritten; code points at notebooks/ or docs/, which keep their findings."""
    cites = [f"{name}:{i}" for name, path in modules().items()
             for i, line in enumerate(open(path, encoding="utf-8"), 1) if "README" in line]
    assert not cites, cites


PLAIN_TRAINING = r"""
import sys
from minivlm.train.loop import main
code = main(sys.argv[1], sys.argv[2:])
print("MODULES " + " ".join(sorted(m for m in sys.modules if m.startswith("minivlm"))))
sys.exit(code)
"""


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_plain_training_loads_no_shapes_lab_or_bench_code(shapes_dir, shapes_tokenizer_path, tmp_path, fmt):
    data = shapes_dir / "pretrain.jsonl"
    if fmt == "parquet":  # the same samples, images inside the file
        from minivlm.data.parquet import write_parquet
        rows = []
        for line in open(data, encoding="utf-8"):
            rec = json.loads(line)
            rows.append((rec["conversations"], [(shapes_dir / rec["image"]).read_bytes()]))
        data = tmp_path / "pretrain.parquet"
        write_parquet(data, rows)
    r = subprocess.run([sys.executable, "-c", PLAIN_TRAINING, "pretrain", "--preset", "tiny", "--data", str(data),
                        "--tokenizer", str(shapes_tokenizer_path), "--out", str(tmp_path / "out"), "--batch-size", "4",
                        "--num-workers", "0", "--max-steps", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    loaded = r.stdout.split("MODULES ")[1].split()
    assert "minivlm.train.loop" in loaded and "minivlm.model.vlm" in loaded
    assert not [m for m in loaded if layer_of(m) in ("synthetic", "lab", "bench", "clip", "web")], loaded


def test_synthetic_training_plugs_the_shapes_world_in(shapes_tokenizer_path, tmp_path):
    r = subprocess.run([sys.executable, "-c", PLAIN_TRAINING, "sft", "--preset", "tiny", "--data", "synthetic",
                        "--tokenizer", str(shapes_tokenizer_path), "--out", str(tmp_path), "--init",
                        "missing.pth"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "missing.pth: no pretrain checkpoint" in r.stdout
    assert "minivlm.synthetic.training" in r.stdout.split("MODULES ")[1].split()


@pytest.mark.parametrize("command", ["synthetic", "tokenizer", "data", "features", "web", "clip", "grow", "probe",
                                     "bench", "bench.memory", "bench.compile_speed"])
def test_every_command_still_answers_help(command):
    r = subprocess.run([sys.executable, "-m", f"minivlm.{command}", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_the_readme_is_a_guide_not_a_lab_notebook():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    assert len(lines) <= 400, len(lines)
    assert not [l for l in lines if l.startswith("#") and "Round" in l], "investigation rounds belong in docs/"
    for link in ("notebooks/08_when_a_vlm_does_not_look.ipynb", "docs/benchmarks.md", "docs/demo_history.md"):
        assert link in "\n".join(lines) and os.path.exists(os.path.join(ROOT, link)), link
