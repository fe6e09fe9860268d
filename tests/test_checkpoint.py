import math
import os

import pytest
import torch

from minivlm.model.checkpoint import load_vlm, save_vlm
from minivlm.model.layouts import convert_2025_02
from minivlm.model.config import LMConfig, VisionConfig, VLMConfig
from minivlm.model.vision import CLIPVisionModel
from minivlm.model.vlm import MiniMindVLM
from minivlm.model.weights import WeightsError, read_safetensors, write_safetensors


def cfg(**lm):
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512)
    base.update(lm)
    return VLMConfig(lm=LMConfig(**base), vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=32, patch_size=16))


def test_safetensors_round_trip(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16(),
         "d": torch.arange(7), "e": torch.tensor(True), "empty": torch.zeros(0, 3)}
    write_safetensors(t, tmp_path / "x.safetensors", {"format": "pt"})
    back = read_safetensors(tmp_path / "x.safetensors")
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)


def test_safetensors_corrupt_files_are_named(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x05")
    with pytest.raises(WeightsError, match="bad.safetensors: too short"):
        read_safetensors(p)
    p.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(WeightsError, match="header length"):
        read_safetensors(p)
    write_safetensors({"w": torch.zeros(4)}, p)
    p.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(WeightsError, match="'w'"):
        read_safetensors(p)


@pytest.mark.parametrize("moe", [False, True])
def test_save_then_load_vlm_gives_the_same_logits(tmp_path, moe):
    torch.manual_seed(0)
    c = cfg(use_moe=moe)
    m = MiniMindVLM(c, placeholder_id=34).eval()
    m.vision_encoder.save_pretrained(tmp_path / "clip")
    save_vlm(m, tmp_path / "vlm.pth", dtype=torch.float32)
    sd = torch.load(tmp_path / "vlm.pth", weights_only=True)
    assert not any(k.startswith("vision_encoder.") for k in sd)
    loaded = load_vlm(tmp_path / "vlm.pth", vision=tmp_path / "clip").eval()
    ids = torch.tensor([[1, 34, 34, 34, 34, 5, 6]])
    px = torch.randn(1, 1, 3, 32, 32)
    torch.testing.assert_close(loaded(ids, px).logits, m(ids, px).logits)


@pytest.mark.parametrize("with_json", [True, False])
def test_untied_model_saves_and_loads_its_own_lm_head(tmp_path, with_json):
    torch.manual_seed(0)
    m = MiniMindVLM(cfg(tie_word_embeddings=False), placeholder_id=34).eval()
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert 0.9 < m.model.embed_tokens.weight.std().item() < 1.1  # unit-scale embeddings when untied
    if with_json:
        save_vlm(m, tmp_path / "vlm.pth", dtype=torch.float32)
        loaded = load_vlm(tmp_path / "vlm.pth", vision=m.vision_encoder)
    else:
        torch.save(m.lm_state_dict(), tmp_path / "vlm.pth")
        loaded = load_vlm(tmp_path / "vlm.pth", vision=m.vision_encoder, num_attention_heads=4)
    assert loaded.config.tie_word_embeddings is False
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, m.lm_head.weight)
    ids, px = torch.tensor([[1, 34, 34, 34, 34, 5, 6]]), torch.randn(1, 1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(ids, px).logits, m(ids, px).logits)


def test_untied_weights_into_a_tied_model_are_refused(tmp_path):
    m = MiniMindVLM(cfg(tie_word_embeddings=False))
    save_vlm(m, tmp_path / "vlm.pth", dtype=torch.float32)
    meta = tmp_path / "vlm.json"
    meta.write_text(meta.read_text().replace('"tie_word_embeddings": false', '"tie_word_embeddings": true'))
    with pytest.raises(WeightsError, match="vlm.pth: lm_head.weight differs from model.embed_tokens.weight"):
        load_vlm(tmp_path / "vlm.pth", vision=m.vision_encoder)


def test_load_vlm_without_json_infers_config(tmp_path):
    torch.manual_seed(1)
    c = cfg()
    m = MiniMindVLM(c).eval()
    torch.save({k: v.half() for k, v in m.lm_state_dict().items()}, tmp_path / "bare.pth")  # fp16, no JSON
    loaded = load_vlm(tmp_path / "bare.pth", vision=m.vision_encoder, num_attention_heads=4)
    assert loaded.config.num_key_value_heads == 2 and loaded.config.intermediate_size == c.lm.intermediate_size
    torch.testing.assert_close(loaded.vision_proj.vision_proj[0].weight, m.vision_proj.vision_proj[0].weight.half().float())


def test_load_vlm_reports_missing_unexpected_and_misshaped_keys(tmp_path):
    m = MiniMindVLM(cfg())
    sd = m.lm_state_dict()
    bad = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    bad["model.layers.1.mlp.up_proj.wieght"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"bad.pth.*1 missing: model.layers.1.mlp.up_proj.weight.*"
                                           r"1 unexpected: model.layers.1.mlp.up_proj.wieght"):
        load_vlm(tmp_path / "bad.pth", vision=m.vision_encoder, num_attention_heads=4)
    with pytest.raises(WeightsError, match="not found"):
        load_vlm(tmp_path / "nothing.pth", vision=m.vision_encoder)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="junk.pth: cannot be read"):
        load_vlm(tmp_path / "junk.pth", vision=m.vision_encoder)


# --- the 2025-02 layout: interleaved RoPE ---------------------------------------------------

def interleaved_reference_logits(sd, ids, n_heads, n_kv, theta=1e6, eps=1e-5):
    """An independent forward pass written the 2025-02 way: complex-number (interleaved) RoPE."""
    x = sd["tok_embeddings.weight"][ids]
    B, T, H = x.shape
    hd = H // n_heads
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.outer(torch.arange(T).float(), freqs)
    rot = torch.polar(torch.ones_like(angles), angles)  # (T, hd/2)

    def rms(v, w):
        return w * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps))

    def rope(v):  # v (B, T, h, hd): pairs (2i, 2i+1) are one complex number
        c = torch.view_as_complex(v.reshape(*v.shape[:-1], hd // 2, 2))
        return torch.view_as_real(c * rot[None, :, None]).flatten(-2)

    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("layers.")})):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q = rope((h @ sd[p + "attention.wq.weight"].T).view(B, T, n_heads, hd))
        k = rope((h @ sd[p + "attention.wk.weight"].T).view(B, T, n_kv, hd))
        v = (h @ sd[p + "attention.wv.weight"].T).view(B, T, n_kv, hd)
        k, v = k.repeat_interleave(n_heads // n_kv, 2), v.repeat_interleave(n_heads // n_kv, 2)
        att = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(hd) + mask
        y = (att.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, H)
        x = x + y @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        ff = torch.nn.functional.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)
        x = x + ff @ sd[p + "feed_forward.w2.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def test_2025_02_layout_converts_to_the_same_logits(tmp_path):
    torch.manual_seed(2)
    c = cfg()
    m = MiniMindVLM(c).eval()
    g = torch.Generator().manual_seed(0)
    H, V, F_ = 64, 97, c.lm.intermediate_size
    old = {"tok_embeddings.weight": torch.randn(V, H, generator=g) * 0.5, "norm.weight": 1 + 0.1 * torch.randn(H, generator=g)}
    old["output.weight"] = old["tok_embeddings.weight"]
    for i in range(2):
        p = f"layers.{i}."
        for n, shape in {"attention.wq": (64, H), "attention.wk": (32, H), "attention.wv": (32, H), "attention.wo": (H, 64),
                         "feed_forward.w1": (F_, H), "feed_forward.w3": (F_, H), "feed_forward.w2": (H, F_)}.items():
            old[p + n + ".weight"] = torch.randn(*shape, generator=g) * 0.2
        old[p + "attention_norm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        old[p + "ffn_norm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
    old["vision_proj.vision_proj.0.weight"] = torch.randn(64, 32, generator=g)
    old["vision_proj.vision_proj.0.bias"] = torch.randn(64, generator=g)
    old["layers.0.attention.mask"] = torch.zeros(1)  # a derived buffer old files carried: ignored
    torch.save(old, tmp_path / "old.pth")
    ids = torch.randint(0, V, (2, 9), generator=g)
    expected = interleaved_reference_logits(old, ids, 4, 2)
    loaded = load_vlm(tmp_path / "old.pth", vision=m.vision_encoder, num_attention_heads=4).eval()
    torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-4, rtol=1e-4)
    # renaming alone (no row permutation) would NOT give the same logits
    renamed = convert_2025_02(old, 4)
    assert not torch.equal(renamed["model.layers.0.self_attn.q_proj.weight"], old["layers.0.attention.wq.weight"])


# ---------------------------------------------------------------------------------------------
# Loading lean: only the wanted tensors, straight into the destination dtype, no random init

FIX_CLIP = os.path.join(os.path.dirname(__file__), "fixtures", "clip_tiny")


def test_reading_a_subset_equals_reading_all_then_selecting():
    path = f"{FIX_CLIP}/model.safetensors"
    every = read_safetensors(path)
    wanted = [k for k in every if k.startswith("vision_model.encoder.layers.1.")]
    for keys in (wanted, lambda k: k.startswith("vision_model.encoder.layers.1.")):
        got = read_safetensors(path, keys=keys)
        assert list(got) == wanted and all(torch.equal(got[k], every[k]) for k in wanted)
    bf16 = read_safetensors(path, keys=wanted, dtype=torch.bfloat16)
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], every[k].bfloat16()) for k in wanted)


@pytest.fixture
def init_calls(monkeypatch):
    """Records every nn.init call that touches real memory (a meta tensor costs nothing); shapes_only
    switches these off while a loader builds its modules."""
    calls = []
    for name in ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_"):
        original = getattr(torch.nn.init, name)

        def spy(tensor, *a, _original=original, _name=name, **kw):
            if not tensor.is_meta:
                calls.append((_name, tuple(tensor.shape)))
            return _original(tensor, *a, **kw)

        monkeypatch.setattr(torch.nn.init, name, spy)
    return calls


def test_clip_tower_loads_in_bf16_without_random_init(init_calls):
    tower = CLIPVisionModel.from_pretrained(FIX_CLIP, dtype=torch.bfloat16)
    assert init_calls == []  # before: every Linear was randomly initialised, then overwritten
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    ref = read_safetensors(f"{FIX_CLIP}/model.safetensors")
    assert torch.equal(tower.vision_model.post_layernorm.weight, ref["vision_model.post_layernorm.weight"].bfloat16())


def test_load_vlm_in_bf16_without_random_init(tmp_path, init_calls):
    torch.manual_seed(0)
    m = MiniMindVLM(cfg(), placeholder_id=34).eval()
    m.vision_encoder.save_pretrained(tmp_path / "clip")
    save_vlm(m, tmp_path / "vlm.pth", dtype=torch.float32)
    init_calls.clear()
    loaded = load_vlm(tmp_path / "vlm.pth", vision=tmp_path / "clip", dtype=torch.bfloat16).eval()
    assert init_calls == []
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied: one parameter
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    ids, px = torch.tensor([[1, 34, 34, 34, 34, 5, 6]]), torch.randn(1, 1, 3, 32, 32)
    torch.testing.assert_close(loaded(ids, px.bfloat16()).logits.float(), m(ids, px).logits, atol=0.05, rtol=0.05)


def test_loading_writes_no_random_init_and_imports_no_meta_kernels(tmp_path):
    """A fresh process loads a checkpoint + tower and answers: the Python meta kernels (sympy, ~75 MB of
    RSS) stay unimported, and bench.memory's child reports the RSS growth of the load and the first answer."""
    import json
    import subprocess
    import sys
    torch.manual_seed(0)
    m = MiniMindVLM(cfg(), placeholder_id=34).eval()
    m.vision_encoder.save_pretrained(tmp_path / "clip")
    save_vlm(m, tmp_path / "vlm.pth", dtype=torch.float32)
    code = ("import sys; from minivlm.model.checkpoint import load_vlm; "
            f"load_vlm({str(tmp_path / 'vlm.pth')!r}, vision={str(tmp_path / 'clip')!r}); print('sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    out = subprocess.run([sys.executable, "-m", "minivlm.bench.memory", "--weights", str(tmp_path / "vlm.pth"),
                          "--vision", str(tmp_path / "clip")], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    from minivlm.bench.memory import kept_bytes
    assert r["weights_mb"] == pytest.approx(kept_bytes(load_vlm(tmp_path / "vlm.pth", vision=tmp_path / "clip")) / 2**20)
    assert 0 <= r["load_growth_mb"] <= r["answer_growth_mb"]
