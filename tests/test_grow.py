"""python -m minivlm.grow: deeper decoder, same function, and the new blocks learn."""

import dataclasses

import pytest
import torch

from minivlm.lab import grow
from minivlm.model.checkpoint import load_with_tokenizer
from minivlm.model.config import VLMConfig, lm_tiny, vision_tiny
from minivlm.model.vlm import MiniMindVLM


def tiny_vlm(**lm):
    torch.manual_seed(0)
    cfg = VLMConfig(lm=dataclasses.replace(lm_tiny(), vocab_size=300, **lm), vision=vision_tiny())
    model = MiniMindVLM(cfg)
    for block in model.model.layers:  # fresh blocks start with small outputs; make them matter
        torch.nn.init.normal_(block.self_attn.o_proj.weight, std=0.1)
    return model.eval()


def inputs(model, batch=2):
    ids = torch.randint(40, 300, (batch, 50))
    ids[:, 5:5 + model.run_length] = model.placeholder_id  # one image per row
    return ids, torch.randn(batch, 1, 3, 96, 96)


@pytest.mark.parametrize("at", [None, 0, 2])
@pytest.mark.parametrize("moe", [False, True])
def test_grown_model_computes_exactly_what_the_original_did(at, moe):
    model = tiny_vlm(use_moe=moe)
    ids, pixels = inputs(model)
    grown = grow.grow_decoder(model, 2, at).eval()
    assert len(grown.model.layers) == 6 and grown.vlm_config.lm.num_hidden_layers == 6
    with torch.no_grad():
        assert torch.equal(model(ids, pixels).logits, grown(ids, pixels).logits)
    # the old blocks kept their weights at their new places; the new ones are not copies of them
    start = 4 if at is None else at
    old_at = [i for i in range(6) if not start <= i < start + 2]
    for i, j in zip(range(4), old_at):
        assert torch.equal(model.model.layers[i].self_attn.q_proj.weight, grown.model.layers[j].self_attn.q_proj.weight)
    for j in range(start, start + 2):
        assert not grown.model.layers[j].self_attn.o_proj.weight.any()
        assert grown.model.layers[j].self_attn.q_proj.weight.abs().sum() > 0  # random, not zero: it can learn
    if model.vlm_config.lm.tie_word_embeddings:
        assert grown.lm_head.weight is grown.model.embed_tokens.weight


def test_new_blocks_learn_from_the_first_step():
    grown = grow.grow_decoder(tiny_vlm(), 2)
    ids, pixels = inputs(grown)
    grown.train()
    loss = grown(ids, pixels, labels=ids).loss
    loss.backward()
    new = grown.model.layers[4]
    assert new.self_attn.o_proj.weight.grad.abs().sum() > 0  # zero weights, non-zero gradient
    assert new.mlp.down_proj.weight.grad.abs().sum() > 0


def test_grow_command_on_the_demo_model(tmp_path, capsys):
    from minivlm.infer.cli import DEMO_WEIGHTS
    from minivlm.infer.generate import encode_batch
    from minivlm.data.prompt import user_turn
    from minivlm.synthetic.world import render, sample_scene
    import random
    assert grow.main(["--weights", DEMO_WEIGHTS, "--out", str(tmp_path), "--add-layers", "1"]) == 0
    assert "decoder blocks" in capsys.readouterr().out
    old, tok, qf = load_with_tokenizer(DEMO_WEIGHTS)
    new, tok2, qf2 = load_with_tokenizer(tmp_path / "sft_vlm_128.pth")  # weights, tokenizer and tower found
    assert qf2 == qf and tok2.vocab_size == tok.vocab_size
    n = old.vlm_config.lm.num_hidden_layers
    assert new.vlm_config.lm.num_hidden_layers == n + 1
    image = render(sample_scene(random.Random(0)), 96)
    batch = encode_batch(old, tok, [([image], [{"role": "user", "content": user_turn("Describe the image.", 1, qf)}])])
    with torch.no_grad():
        a = old(batch["input_ids"], batch["pixel_values"], image_counts=batch["image_counts"]).logits
        b = new(batch["input_ids"], batch["pixel_values"], image_counts=batch["image_counts"]).logits
    assert torch.allclose(a, b, atol=1e-5)  # the file is fp32, the demo fp16: the same numbers either way


def test_grow_command_errors(tmp_path, capsys):
    from minivlm.infer.cli import DEMO_WEIGHTS
    assert grow.main(["--weights", str(tmp_path / "none.pth"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert grow.main(["--weights", DEMO_WEIGHTS, "--out", str(tmp_path), "--at", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--at 99" in err
    with pytest.raises(SystemExit):
        grow.main(["--weights", DEMO_WEIGHTS, "--out", str(tmp_path), "--add-layers", "0"])
