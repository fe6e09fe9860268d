import pytest
import torch

from minivlm.model.config import LMConfig, VisionConfig, VLMConfig
from minivlm.model.vlm import MiniMindVLM, find_image_runs

PH = 34


def small_vlm(**kw):
    cfg = VLMConfig(lm=LMConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=512),
                    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16), **kw)
    torch.manual_seed(0)
    return MiniMindVLM(cfg, placeholder_id=PH).eval()


def run(n=4):
    return [PH] * n


def test_find_runs_with_unfold():
    ids = torch.tensor([[1, *run(), 2, *run(), 3], [*run(8), 5, 6, 7]])
    starts = find_image_runs(ids, PH, 4)
    assert starts[0].nonzero().flatten().tolist() == [1, 6]
    assert starts[1].nonzero().flatten().tolist() == [0, 4]  # a double-length run = two images


@pytest.mark.parametrize("row", [
    [1, *run(3), 2, 3, 4, 5, 6, 7],  # run too short
    [1, *run(5), 2, 3, 4, 5, 6],  # a stray placeholder next to a run
    [1, *run(4), 2, PH, 3, 4, 5, 6],  # a lone placeholder elsewhere
])
def test_broken_runs_raise_naming_the_sample(row):
    ids = torch.tensor([[1] * len(row), row])
    with pytest.raises(ValueError, match="sample 1"):
        find_image_runs(ids, PH, 4)


def test_splice_puts_feature_j_of_image_k_at_placeholder_j_of_run_k():
    m = small_vlm()
    L = m.run_length
    assert L == 4
    ids = torch.tensor([
        [1, *run(), 2, 3, *run(), 4],
        [5, 6, 7, *run(), 8, 9, 10, 11, 12],
        [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22],
    ])
    px = torch.randn(3, 2, 3, 32, 32)
    counts = torch.tensor([2, 1, 0])
    embeds = m.model.embed_tokens(ids)
    out = m.splice_images(ids, embeds, px, counts)
    feats = m.encode_images(px.reshape(-1, 3, 32, 32)).view(3, 2, L, 64)
    expected = embeds.clone()
    expected[0, 1:5] = feats[0, 0]
    expected[0, 7:11] = feats[0, 1]
    expected[1, 3:7] = feats[1, 0]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # and every other embedding untouched, bit for bit
    untouched = torch.ones(3, 12, dtype=torch.bool)
    untouched[0, 1:5] = untouched[0, 7:11] = untouched[1, 3:7] = False
    assert torch.equal(out[untouched], embeds[untouched])


def test_images_are_batched_through_the_tower_once(monkeypatch):
    m = small_vlm()
    calls = []
    orig = m.vision_encoder.select_features
    monkeypatch.setattr(m.vision_encoder, "select_features", lambda px: calls.append(px.shape) or orig(px))
    ids = torch.tensor([[1, *run(), 2, *run()], [1, *run(), 2, 3, 4, 5, 6]])
    m(ids, torch.randn(2, 2, 3, 32, 32), image_counts=torch.tensor([2, 1]))
    assert calls == [(3, 3, 32, 32)]


def test_run_image_count_mismatch_raises():
    m = small_vlm()
    ids = torch.tensor([[1, *run(), 2], [1, *run(), 3]])
    with pytest.raises(ValueError, match=r"sample 1: 1 image placeholder run\(s\) but 2 image\(s\)"):
        m(ids, torch.randn(2, 2, 3, 32, 32), image_counts=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="sample 0: 1 image placeholder run"):
        m(ids, torch.randn(2, 2, 3, 32, 32))  # default: all N slots are images
    with pytest.raises(ValueError, match="no pixel_values"):
        m(ids)


def test_vision_runs_only_at_prefill_and_cache_matches_full(monkeypatch):
    m = small_vlm()
    ids = torch.tensor([[1, 2, *run(), 3, 4, 5, 6, 7]])
    px = torch.randn(1, 1, 3, 32, 32)
    full = m(ids, px).logits
    out = m(ids[:, :7], px, use_cache=True)
    calls = []
    monkeypatch.setattr(m, "encode_images", lambda *a: calls.append(1))
    steps = [out.logits]
    for t in range(7, ids.shape[1]):
        out = m(ids[:, t:t + 1], px, past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    assert calls == []
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_vlm_loss_and_frozen_tower_gets_no_gradient():
    m = small_vlm().train()
    ids = torch.tensor([[1, *run(), 2, 3, 4], [5, 6, *run(), 7, 8]])
    labels = ids.clone()
    labels[:, :6] = -100
    out = m(ids, torch.randn(2, 1, 3, 32, 32), labels=labels)
    out.loss.backward()
    assert all(p.grad is None for p in m.vision_encoder.parameters())
    assert m.vision_proj.vision_proj[0].weight.grad.abs().sum() > 0
    assert not m.vision_encoder.training  # a frozen tower stays in eval mode


def test_projector_types_and_checkpoint_keys():
    assert "vision_proj.vision_proj.0.weight" in small_vlm().lm_state_dict()
    mlp = small_vlm(projector_type="mlp2x_gelu").lm_state_dict()
    assert {"vision_proj.vision_proj.0.weight", "vision_proj.vision_proj.2.bias"} <= set(mlp)
    assert not any(k.startswith("vision_encoder.") for k in mlp)
    with pytest.raises(ValueError, match="identity"):
        small_vlm(projector_type="identity")  # 32 -> 64 cannot be the identity
