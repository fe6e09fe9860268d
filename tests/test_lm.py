import dataclasses

import pytest
import torch
import torch.nn.functional as F

from minivlm.model.config import LMConfig, lm_104m, lm_26m, lm_26m_moe, vlm_preset
from minivlm.model.lm import KVCache, MiniMindLM, apply_rope, rope_tables


def tiny(**kw):
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
    base.update(kw)
    return LMConfig(**base)


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_minimind():
    assert count(MiniMindLM(lm_26m())) == 25_829_888
    assert count(MiniMindLM(lm_104m())) == 104_030_976
    moe = count(MiniMindLM(lm_26m_moe()))
    assert 94e6 < moe < 96e6
    assert lm_26m().intermediate_size == 1408 and lm_104m().intermediate_size == 2048


def test_state_dict_keys_are_the_2025_04_layout():
    keys = set(MiniMindLM(lm_26m()).state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(8):
        p = f"model.layers.{i}."
        expected |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        expected |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    assert keys == expected
    moe_keys = set(MiniMindLM(tiny(use_moe=True)).state_dict())
    assert "model.layers.0.mlp.gate.weight" in moe_keys
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in moe_keys
    assert "model.layers.1.mlp.shared_experts.0.up_proj.weight" in moe_keys


def test_embeddings_are_tied():
    m = MiniMindLM(tiny())
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_rope_depends_only_on_relative_position():
    cos, sin = rope_tables(16, 64, 1e6)
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):
        return (apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])).item()

    assert score(7, 3) == pytest.approx(score(30, 26), abs=1e-4)
    assert score(12, 0) == pytest.approx(score(52, 40), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    # rotation keeps the norm
    assert apply_rope(q, cos[9], sin[9]).norm() == pytest.approx(q.norm().item(), rel=1e-5)


@pytest.mark.parametrize("moe", [False, True])
def test_kv_cache_step_by_step_equals_full_forward(moe):
    torch.manual_seed(0)
    m = MiniMindLM(tiny(use_moe=moe)).eval()
    ids = torch.randint(0, 97, (2, 12))
    full = m(ids).logits
    out = m(ids[:, :5], use_cache=True)
    cache = out.past_key_values
    steps = [out.logits]
    for t in range(5, 12):
        out = m(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_kv_cache_grows_in_place():
    c = KVCache()
    k = torch.randn(1, 2, 3, 4)
    c.update(0, k, k)
    c.advance(3)
    for i in range(10):
        kk, vv = c.update(0, torch.full((1, 2, 1, 4), float(i)), torch.zeros(1, 2, 1, 4))
        c.advance(1)
    assert kk.shape == (1, 2, 13, 4)
    torch.testing.assert_close(kk[:, :, :3], k)
    assert kk[0, 0, 3:, 0].tolist() == [float(i) for i in range(10)]
    assert c.keys[0].shape[2] >= 13


def test_left_padded_batch_equals_unpadded_rows():
    torch.manual_seed(1)
    m = MiniMindLM(tiny()).eval()
    a = torch.randint(3, 97, (10,))
    b = torch.randint(3, 97, (6,))
    ids = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])
    mask = torch.tensor([[1] * 10, [0] * 4 + [1] * 6])
    out = m(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], m(a[None]).logits[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, 4:], m(b[None]).logits[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fully_padded_rows_do_not_produce_nan(dtype, impl):
    torch.manual_seed(2)
    m = MiniMindLM(tiny(attn_impl=impl)).to(dtype).eval()
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    out = m(ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()


def test_eager_attention_matches_sdpa_and_returns_weights():
    torch.manual_seed(3)
    cfg = tiny()
    m = MiniMindLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.tensor([[1] * 9, [0] * 3 + [1] * 6])
    ref = m(ids, attention_mask=mask).logits
    out = m(ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-4)
    w = out.attentions[0]
    assert w.shape == (2, 4, 9, 9)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 9))
    assert (w[0].triu(1) == 0).all()  # causal
    assert (w[1, :, 3:, :3] == 0).all()  # no attention to padding


def test_logits_to_keep():
    torch.manual_seed(4)
    m = MiniMindLM(tiny()).eval()
    ids = torch.randint(0, 97, (2, 8))
    full = m(ids).logits
    last = m(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-5)


def test_loss_is_shifted_cross_entropy():
    torch.manual_seed(5)
    m = MiniMindLM(tiny())
    ids = torch.randint(0, 97, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    out = m(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)


# ----------------------------------------------------------------------------------------------
# Mixture of experts

def test_moe_gate_weights_and_aux_loss_by_hand():
    torch.manual_seed(6)
    cfg = tiny(use_moe=True)
    m = MiniMindLM(cfg).train()
    moe = m.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    idx, w, aux = moe.gate(x)
    assert idx.shape == (10, 2) and w.shape == (10, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(10))
    scores = (x.reshape(-1, 64) @ moe.gate.weight.T).softmax(-1)
    top = scores.topk(2, dim=-1)
    assert set(map(tuple, idx.sort(-1).values.tolist())) == set(map(tuple, top.indices.sort(-1).values.tolist()))
    # seq-aux by hand: for each sequence, frequency of each expert (normalised so uniform = 1) x mean score
    expected = 0.0
    for b in range(2):
        freq = torch.zeros(4)
        for t in range(5):
            for e in top.indices[b * 5 + t]:
                freq[e] += 1
        freq = freq / (5 * 2 / 4)
        expected += (freq * scores[b * 5:(b + 1) * 5].mean(0)).sum()
    expected = expected / 2 * cfg.aux_loss_alpha
    torch.testing.assert_close(aux, expected)
    aux.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    m.eval()
    assert moe.gate(x)[2].item() == 0.0  # no aux loss at inference


def test_moe_dispatch_equals_naive_per_token_loop():
    torch.manual_seed(7)
    m = MiniMindLM(tiny(use_moe=True)).eval()
    moe = m.model.layers[1].mlp
    x = torch.randn(3, 7, 64)
    y = moe(x)
    idx, w, _ = moe.gate(x)
    flat = x.reshape(-1, 64)
    ref = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(idx.shape[1]):
            ref[t] += w[t, j] * moe.experts[int(idx[t, j])](flat[t])
        ref[t] += moe.shared_experts[0](flat[t])
    torch.testing.assert_close(y, ref.view(3, 7, 64), atol=1e-5, rtol=1e-4)


def test_moe_aux_loss_reaches_model_loss():
    torch.manual_seed(8)
    m = MiniMindLM(tiny(use_moe=True)).train()
    ids = torch.randint(0, 97, (2, 6))
    out = m(ids, labels=ids)
    assert out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss - out.aux_loss,
                               F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)))


def test_vlm_trainable_capable_parameter_count():
    from minivlm.model.vlm import MiniMindVLM
    cfg = vlm_preset("26m")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_hidden_layers=1))
    m = MiniMindVLM(cfg)
    n = sum(v.numel() for k, v in m.named_parameters() if not k.startswith("vision_encoder."))
    assert n == 26_223_616


@pytest.mark.parametrize("use_moe,padded,qk_norm", [(False, False, False), (True, False, False),
                                                    (False, True, False), (False, True, True)])
def test_loss_without_logits_matches_full_loss_and_gradients(use_moe, padded, qk_norm):
    """return_logits=False runs the output layer on labelled positions only, and (dense) the last block's
    queries and MLP there only: same loss, same gradients, padding and samples without labels included."""
    torch.manual_seed(9)
    m = MiniMindLM(tiny(use_moe=use_moe, num_hidden_layers=3, qk_norm=qk_norm)).train()
    ids = torch.randint(0, 97, (3, 10))
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 8:] = -100  # rows with different numbers of labels, padding-like holes
    mask = None
    if padded:
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[2, 7:] = 0  # right padding
        labels[2, 7:] = -100
        labels[0] = -100  # a sample with nothing to learn
    grads = []
    for return_logits in (True, False):
        torch.manual_seed(1)  # the same dropout/routing draws in both passes
        m.zero_grad()
        seen = []
        hook = m.model.layers[-1].mlp.register_forward_hook(lambda mod, args, y: seen.append(args[0].shape[1]))
        out = m(ids, attention_mask=mask, labels=labels, return_logits=return_logits)
        hook.remove()
        # the last block's MLP ran at every position, or (dense, loss only) at the most labels in one row
        assert seen == [10 if return_logits or use_moe else 2 if padded else 4]
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        assert (out.logits is None) == (not return_logits)
    (full, g_full), (sel, g_sel) = grads
    torch.testing.assert_close(sel, full)
    assert g_full.keys() == g_sel.keys()
    for n in g_full:
        torch.testing.assert_close(g_sel[n], g_full[n], atol=1e-6, rtol=1e-5, msg=n)
