"""python -m minivlm.probe: the diagnostics behind notebook 08 (when a VLM does not look)."""

import torch

from minivlm.lab import probe


def test_linear_probe_reads_a_linearly_coded_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (400,), generator=g)
    coded = torch.nn.functional.one_hot(y, 5).float() @ torch.randn(5, 16, generator=g) + 0.1 * torch.randn(400, 16, generator=g)
    assert probe.linear_probe(coded, y, 5) > 0.95
    assert probe.linear_probe(torch.randn(400, 16, generator=g), y, 5) < 0.5  # chance is 0.2


def test_probe_runs_on_the_demo_model(capsys):
    assert probe.main(["--scenes", "2"]) == 0
    out = capsys.readouterr().out
    for group in ("both right", "shape only", "colour only", "neither"):
        assert group in out
    # 2 one-object scenes x 35 colour/shape pairs: 2 right, 2 x 6 with only the shape right (another
    # colour), 2 x 4 with only the colour right (another shape), 2 x 24 with neither
    assert "both right   n=   2" in out and "shape only   n=  12" in out and "colour only  n=   8" in out
    assert "neither      n=  48" in out
    assert "layer 3" in out and "vision" in out


def test_text_lookup_samples_hold_the_caption_the_question_and_its_answer():
    import random
    from minivlm.model.checkpoint import tokenizer_beside
    from minivlm.infer.cli import DEMO_WEIGHTS
    from minivlm.synthetic.world import CELLS, COLOUR_NAMES, SHAPES
    from minivlm.data.tokenizer import Tokenizer
    tok = Tokenizer.from_file(tokenizer_beside(DEMO_WEIGHTS))
    valid = {"colour": set(COLOUR_NAMES), "shape": set(SHAPES), "position": set(CELLS), "exists": {"yes", "no"}}
    rng = random.Random(0)
    for _ in range(50):
        qtype, n, prompt, answer = probe.lookup_sample(tok, rng)
        text = tok.decode(prompt)
        assert text.startswith("I see ") and text.endswith("? Answer:") and 1 <= n <= 3
        assert tok.decode(answer).strip() in valid[qtype]


def test_text_lookup_reports_every_type_for_one_and_several_objects():
    from minivlm.model.checkpoint import tokenizer_beside
    from minivlm.infer.cli import DEMO_WEIGHTS
    from minivlm.data.tokenizer import Tokenizer
    tok = Tokenizer.from_file(tokenizer_beside(DEMO_WEIGHTS))
    curve = list(probe.text_lookup(tok, steps=4, seed=0, every=2))
    assert [step for step, _, _ in curve] == [2, 4]
    for _, acc, share in curve:
        assert set(acc) == {(t, several) for t in probe.LOOKUP_TYPES for several in (False, True)}
        assert all(0 <= v <= 100 for v in acc.values())
        assert share > 0  # 400 different questions cannot all leave exactly the same state
    one = list(probe.text_lookup(tok, steps=2, seed=0, every=2, types=("exists",), max_objects=1, tie=False))
    assert set(one[0][1]) == {("exists", False)}


def test_text_lookup_command_line(capsys):
    assert probe.main(["--text-lookup", "2", "--every", "1", "--types", "exists", "--max-objects", "1",
                       "--untied"]) == 0
    out = capsys.readouterr().out
    assert "untied" in out and "exists" in out and "colour" not in out.split("step")[1]
    assert len([line for line in out.splitlines() if line.strip().startswith(("1 ", "2 "))]) == 2


def test_binding_probes_on_the_demo_model(capsys):
    assert probe.main(["--binding", "--scenes", "2"]) == 0
    out = capsys.readouterr().out
    assert "/ 6" in out and "of 2 scenes" in out  # 2 scenes x 3 objects asked, for both question kinds
    pointer = out.split("2-3 objects:")[1].splitlines()[1]
    assert sum(int(part.rsplit(": ", 1)[1]) for part in pointer.split("   ")) == 2  # every scene counted once
    assert "Where is the <shape>?          layer 0:" in out and "layer 3:" in out


def test_binding_probes_count_every_scene_and_question_once():
    import random
    p = probe.Probe(probe.DEMO_WEIGHTS)
    counts = probe.caption_pointer(p, 3, random.Random(0))
    assert sum(counts.values()) == 3
    stats = probe.same_answer_whatever_asked(p, 2, random.Random(0))
    assert stats["colour"]["asked"] == 6 and 0 <= stats["position"]["same"] <= 2
    assert stats["colour"]["right"] >= 5  # the demo names each object's colour (6 of 6 when this was written)
