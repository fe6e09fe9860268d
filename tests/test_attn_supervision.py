"""Attention supervision (--attn-sup): the targets point at the right pixels and tokens, the loss is the
attention the decoder really computes, and training with it raises that attention."""
import csv
import dataclasses

import numpy as np
import pytest
import torch

from minivlm.synthetic.attention import SINK, AttentionTap, cell_tokens, look_loss, look_targets
from minivlm.model.config import VLMConfig, lm_26m, vlm_preset
from minivlm.synthetic.training import collate_with_looks
from minivlm.synthetic.world import COLOURS, DIFF_QUESTION, Obj, Scene, render
from minivlm.synthetic.dataset import SyntheticVLMDataset
from minivlm.data.tokenizer import Tokenizer
from minivlm.train.loop import main
from minivlm.model.vlm import MiniMindVLM

SCENE = Scene([Obj("star", "red", "large", 0), Obj("circle", "blue", "small", 4), Obj("circle", "green", "large", 8)])


def test_targets_follow_the_question():
    assert look_targets("What colour is the star?", [SCENE]) == [(0, 0)]
    assert look_targets("What shape is the green object?", [SCENE]) == [(0, 8)]
    assert look_targets("Where is the star?", [SCENE]) == [(0, 0)]
    assert look_targets("Where is the blue circle?", [SCENE]) == [(0, 4)]
    assert look_targets("Is there a green circle?", [SCENE]) == [(0, 8)]
    assert look_targets("Is there a red circle?", [SCENE]) == SINK  # a near miss: nothing to look at
    assert look_targets("Is there an orange star?", [SCENE]) == SINK
    assert look_targets("How many shapes are there?", [SCENE]) == [(0, 0), (0, 4), (0, 8)]
    assert look_targets("Describe the image.", [SCENE]) is None
    second = Scene([SCENE.objects[0], SCENE.objects[2]])  # the blue circle removed
    assert look_targets(DIFF_QUESTION, [SCENE, second]) == [(0, 4), (1, 4)]  # the object, and where it is missing


@pytest.mark.parametrize("size,patch", [(96, 16), (224, 16)])
def test_cell_tokens_cover_the_objects_pixels(size, patch):
    grid = size // patch
    if size == 96:  # cells are whole patches: the cells' tokens partition the image's tokens
        assert sorted(t for c in range(9) for t in cell_tokens(c, grid)) == list(range(grid * grid))
    for cell in range(9):
        scene = Scene([Obj("square", "yellow", "large", cell)])
        pixels = np.asarray(render(scene, size)).astype(int)
        is_object = (np.abs(pixels - COLOURS["yellow"]).sum(-1) < 30)  # (size, size)
        per_patch = is_object.reshape(grid, patch, grid, patch).sum((1, 3)).flatten()  # object pixels per patch
        inside = cell_tokens(cell, grid)
        outside = [t for t in range(grid * grid) if t not in inside]
        assert per_patch.sum() > 0 and per_patch[outside].sum() == 0, (size, cell)


def sample_batch(tok, kind, n, run_length=36, image_size=96):
    ds = SyntheticVLMDataset(kind, n, 3, tok, run_length, 400, image_size=image_size, questions_per_image=4, look=True)
    return ds, collate_with_looks([ds[i] for i in range(n)], tok.pad_id)


@pytest.mark.parametrize("kind", ["sft", "multi"])
def test_rows_predict_answer_tokens_and_keys_are_the_asked_objects_tokens(shapes_tokenizer_path, kind):
    tok = Tokenizer.from_file(shapes_tokenizer_path)
    ds, batch = sample_batch(tok, kind, 6)
    ids, labels = batch["input_ids"], batch["labels"]
    rows, keys = batch["look_rows"], batch["look_keys"]
    assert len(rows) > 6
    for (b, pos), k in zip(rows.tolist(), keys):
        assert labels[b, pos + 1] not in (-100, tok.eos_id)  # the next token is a trained answer token
        targets = k.nonzero().flatten().tolist()
        assert targets == [0] or all(ids[b, t] == tok.placeholder_id for t in targets)
    # every lookup answer of every sample is supervised, and "describe" never
    for b in range(len(ds)):
        _, sample, scenes = ds.example(b, with_scenes=True)
        questions = [m["content"] for m in sample["conversations"] if m["role"] == "user"]
        answers = [m["content"] for m in sample["conversations"] if m["role"] == "assistant"]
        expected = sum(len(tok.encode(a)) for q, a in zip(questions, answers)
                       if look_targets(q.replace("<image>", ""), scenes) is not None)
        assert (rows[:, 0] == b).sum() == expected


@pytest.mark.parametrize("preset", ["tiny", "26m"])
def test_look_loss_is_minus_log_of_the_decoders_own_attention(shapes_tokenizer_path, preset):
    """The tap recomputes q and k from the layer's input; the result must be the attention the layer computes
    (here read back with output_attentions=True), grouped-query heads and RoPE included."""
    tok = Tokenizer.from_file(shapes_tokenizer_path)
    torch.manual_seed(0)
    if preset == "tiny":
        cfg, run, size = vlm_preset("tiny"), 36, 96
    else:  # the real decoder (8 heads over 2 key/value heads, width 512), two of its layers; 196 tokens per image
        lm = dataclasses.replace(lm_26m(), num_hidden_layers=2, vocab_size=tok.vocab_size)
        cfg, run, size = VLMConfig(lm=lm), 196, 224
    cfg.lm.vocab_size, cfg.placeholder_id = tok.vocab_size, tok.placeholder_id
    model = MiniMindVLM(cfg).eval()
    if preset != "tiny":  # the ViT-B/16 tower is not what is tested here: feed features of the right shape
        model.encode_images = lambda pixels: model.vision_proj(torch.randn(len(pixels), run, 768))
    _, batch = sample_batch(tok, "sft", 2, run, size)
    layer, head = 1, 3
    tap = AttentionTap(model.model.layers[layer].self_attn)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["pixel_values"], image_counts=batch["image_counts"],
                    output_attentions=True)
        loss, mass = look_loss(tap, batch["look_rows"], batch["look_keys"], head)
    rows = batch["look_rows"]
    attn = out.attentions[layer][rows[:, 0], head, rows[:, 1]]  # (R, T)
    expected = (attn * batch["look_keys"]).sum(-1)
    torch.testing.assert_close(mass, expected.mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, -expected.log().mean(), rtol=1e-4, atol=1e-4)
    tap.remove()


def test_training_with_attn_sup_raises_the_attention_on_the_target(shapes_tokenizer_path, tmp_path, capsys):
    common = ["--preset", "tiny", "--data", "synthetic", "--tokenizer", str(shapes_tokenizer_path),
              "--batch-size", "8", "--num-workers", "0", "--synthetic-samples", "100000", "--log-every", "10",
              "--questions-per-image", "4", "--lr", "3e-3", "--warmup-steps", "0", "--seed", "1"]
    assert main("pretrain", common + ["--out", str(tmp_path / "pre"), "--max-steps", "1"]) == 0
    init = ["--init", str(tmp_path / "pre" / "pretrain_vlm_128.pth"), "--max-steps", "60"]
    assert main("sft", common + init + ["--out", str(tmp_path / "sup")]) == 0  # tiny + synthetic: on by default
    assert "attention supervision: head 0 of layer 1, weight 1.0" in capsys.readouterr().out
    with open(tmp_path / "sup" / "log_sft.csv") as f:
        on_target = [float(r["attn_on_target"]) for r in csv.DictReader(f)]
    # 12 image tokens of 1-3 objects (or the first token) among ~60: a head that does not look is near 0.1
    assert on_target[0] < 0.25 and sum(on_target[-3:]) / 3 > 0.4, on_target  # measured: 0.20 -> 0.50
    assert main("sft", common + init + ["--out", str(tmp_path / "off"), "--attn-sup", "0", "--max-steps", "10"]) == 0
    assert "attention supervision" not in capsys.readouterr().out
    with open(tmp_path / "off" / "log_sft.csv") as f:
        assert [r["attn_on_target"] for r in csv.DictReader(f)] == [""]


def test_attn_sup_refuses_what_it_cannot_do(shapes_dir, shapes_tokenizer_path, tmp_path, capsys):
    common = ["--preset", "tiny", "--tokenizer", str(shapes_tokenizer_path), "--out", str(tmp_path),
              "--batch-size", "4", "--num-workers", "0", "--max-steps", "1", "--synthetic-samples", "64"]
    assert main("pretrain", common + ["--data", "synthetic"]) == 0
    capsys.readouterr()
    files = [a for a in common if a != "--synthetic-samples" and a != "64"]
    assert main("sft", files + ["--data", str(shapes_dir / "sft.jsonl"), "--attn-sup", "1"]) == 2
    assert "unrecognized arguments: --attn-sup 1 (the shapes world's flags need --data synthetic)" in capsys.readouterr().err
    assert main("sft", files + ["--data", str(shapes_dir / "sft.jsonl")]) == 0  # off on files: the world is not loaded
    assert main("sft", common + ["--data", "synthetic", "--attn-sup", "-1"]) == 2
    assert "argument --attn-sup: -1: a weight must be a finite number >= 0" in capsys.readouterr().err
    assert main("sft", common + ["--data", "synthetic", "--attn-sup-layer", "4"]) == 2
    assert "--attn-sup-layer 4: the decoder has layers 0..3" in capsys.readouterr().out
    assert main("sft", common + ["--data", "synthetic", "--attn-sup-head", "-1"]) == 2
    assert "--attn-sup-head -1" in capsys.readouterr().out
