"""python -m minivlm.probe: the diagnostics behind the README's section on the demo model."""

import torch

from minivlm import probe


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
