"""SigLIP vision tower (minivlm/model/siglip.py) against Hugging Face's outputs, its HF folder layouts, and
the two minimind-3v pieces next to it: QK-norm in the decoder and the LayerNorm-MLP projector.

Fixtures: tests/fixtures/siglip/, written by tests/fixtures/make_siglip_fixtures.py (transformers is not a
dependency: see that script's docstring)."""
import json
import math
import os
import shutil

import pytest
import torch
from PIL import Image

from minivlm.model.config import ConfigError, LMConfig, VLMConfig, lm_tiny, vision_tiny
from minivlm.model.lm import MiniMindLM, apply_rope
from minivlm.model.projector import VisionProjector
from minivlm.model.siglip import (SiglipVisionConfig, SiglipVisionModel, siglip_preprocess,
                                  siglip_preprocess_settings)
from minivlm.model.vlm import MiniMindVLM
from minivlm.model.weights import WeightsError, read_safetensors, write_safetensors

SIGLIP_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "siglip")


@pytest.fixture(scope="module")
def ref():
    return read_safetensors(os.path.join(SIGLIP_DIR, "ref.safetensors"))


@pytest.fixture(scope="module")
def tower():
    return SiglipVisionModel.from_pretrained(SIGLIP_DIR).eval()


def output_of(model, ref):
    with torch.no_grad():
        return model(ref["pixel_values"])


# ---------------------------------------------------------------------------------------------
# the tower


def test_siglip_tower_matches_reference(tower, ref):
    out = output_of(tower, ref)
    assert out.shape == (2, 16, 32)  # 4x4 patches of 8 px, no CLS token
    # fp32 on CPU: measured 1.6e-6. The exact (erf) GELU instead of the tanh one would miss by 4.9e-4.
    assert (out - ref["last_hidden_state"]).abs().max() <= 1e-5
    torch.testing.assert_close(tower.select_features(ref["pixel_values"]), out)


def test_siglip_head_is_in_the_file_but_skipped(tower):
    keys = read_safetensors(os.path.join(SIGLIP_DIR, "model.safetensors")).keys()
    assert "vision_model.head.probe" in keys and "vision_model.head.attention.in_proj_weight" in keys
    ours = tower.state_dict().keys()
    assert not [k for k in ours if ".head." in k]
    assert set(ours) == {k for k in keys if not k.startswith("vision_model.head.")}
    assert tower.config == SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8)


def test_siglip_save_pretrained_round_trip(tower, ref, tmp_path):
    tower.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["model_type"] == "siglip_vision_model" and cfg["vision_use_head"] is False
    back = SiglipVisionModel.from_pretrained(tmp_path).eval()
    assert back.config == tower.config
    a, b = tower.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("vision_model.") for k in read_safetensors(tmp_path / "model.safetensors"))
    assert torch.equal(output_of(back, ref), output_of(tower, ref))


def copy_folder(tmp_path, rename=None, extra=None, config=None):
    """The fixture folder with its tensors renamed / added and its config.json replaced."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    sd = read_safetensors(os.path.join(SIGLIP_DIR, "model.safetensors"))
    if rename:
        sd = {rename(k): v for k, v in sd.items() if rename(k) is not None}
    sd.update(extra or {})
    write_safetensors(sd, tmp_path / "model.safetensors")
    if config is None:
        shutil.copy(os.path.join(SIGLIP_DIR, "config.json"), tmp_path / "config.json")
    else:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_siglip_reads_other_hf_layouts(ref, tmp_path):
    """transformers 5 saves a SiglipVisionModel without the `vision_model.` prefix; a full SiglipModel file
    nests the config under vision_config and also holds the text tower, logit_scale and logit_bias."""
    unprefixed = copy_folder(tmp_path / "v5", rename=lambda k: k.removeprefix("vision_model."))
    vision_cfg = json.load(open(os.path.join(SIGLIP_DIR, "config.json")))
    full = copy_folder(tmp_path / "full", extra={"text_model.head.weight": torch.zeros(4, 32),
                                                 "logit_scale": torch.zeros(1), "logit_bias": torch.zeros(1)},
                       config={"model_type": "siglip", "vision_config": vision_cfg, "text_config": {}})
    for folder in (unprefixed, full):
        out = output_of(SiglipVisionModel.from_pretrained(folder).eval(), ref)
        assert (out - ref["last_hidden_state"]).abs().max() <= 1e-5


@pytest.mark.parametrize("case, named", [
    ("missing", "vision_model.post_layernorm.weight"),
    ("renamed", "vision_model.encoder.layers.1.mlp.fc3.weight"),
    ("shape", "vision_model.embeddings.position_embedding.weight"),
])
def test_siglip_bad_weights_are_one_line_errors(tmp_path, case, named):
    if case == "missing":
        folder = copy_folder(tmp_path, rename=lambda k: None if k == named else k)
    elif case == "renamed":
        folder = copy_folder(tmp_path, rename=lambda k: k.replace("layers.1.mlp.fc1.weight", "layers.1.mlp.fc3.weight"))
    else:
        folder = copy_folder(tmp_path, extra={named: torch.zeros(17, 32)})
    with pytest.raises(WeightsError) as e:
        SiglipVisionModel.from_pretrained(folder)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_siglip_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(WeightsError, match="config.json: not found"):
        SiglipVisionModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 3}))
    with pytest.raises(WeightsError, match="hidden_size 32 is not divisible"):
        SiglipVisionModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "gelu"}))  # not what SigLIP uses
    with pytest.raises(WeightsError, match="hidden_act"):
        SiglipVisionModel.from_pretrained(tmp_path)
    shutil.copy(os.path.join(SIGLIP_DIR, "config.json"), tmp_path / "config.json")
    with pytest.raises(WeightsError, match="no model.safetensors or pytorch_model.bin"):
        SiglipVisionModel.from_pretrained(tmp_path)


def test_siglip2_base_p32_256_shapes():
    """The defaults are minimind-3v's tower: 64 patches of width 768 (random weights: shapes only)."""
    torch.manual_seed(0)
    config = SiglipVisionConfig()
    assert (config.image_size, config.patch_size, config.num_patches, config.layer_norm_eps) == (256, 32, 64, 1e-6)
    model = SiglipVisionModel(config).eval()
    assert sum(p.numel() for p in model.parameters()) == 87_465_216  # without the ~7M pooling head
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 64, 768) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# preprocessing


def test_siglip_preprocess_matches_reference(ref):
    image = Image.open(os.path.join(SIGLIP_DIR, "image.png"))  # 40x24: squeezed and stretched, never cropped
    settings = siglip_preprocess_settings(SIGLIP_DIR)
    assert settings == {"size": 32, "resample": 2, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    torch.testing.assert_close(siglip_preprocess(image, **settings), ref["pixels_folder"], atol=1e-6, rtol=0)
    # the processor's own defaults: bicubic, mean = std = 0.5
    torch.testing.assert_close(siglip_preprocess(image, size=32), ref["pixels_default"], atol=1e-6, rtol=0)


def test_siglip_preprocess_modes_and_errors(tmp_path):
    clear = Image.new("RGBA", (50, 30), (10, 200, 30, 0))  # fully transparent: white, as HF's processor
    x = siglip_preprocess(clear, size=64)
    assert x.shape == (3, 64, 64) and torch.equal(x, torch.ones_like(x))
    assert siglip_preprocess(Image.new("L", (9, 9), 0)).shape == (3, 256, 256)  # black -> -1
    with pytest.raises(TypeError):
        siglip_preprocess(torch.zeros(3, 8, 8))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 256, "width": 224}}))
    with pytest.raises(WeightsError, match="not a square"):
        siglip_preprocess_settings(tmp_path)


# ---------------------------------------------------------------------------------------------
# QK-norm (LMConfig.qk_norm) and the ln_mlp projector, against their formulas


def rms(x, w, eps):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_qk_norm_matches_formula():
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=64, rms_norm_eps=1e-6, qk_norm=True)
    lm = MiniMindLM(cfg).eval()
    attn = lm.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (8,) and attn.q_norm.eps == 1e-6
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= set(lm.state_dict())
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32)
    cos, sin = lm.model.freqs_cos[:5], lm.model.freqs_sin[:5]
    with torch.no_grad():
        got, _ = attn(x, cos, sin, None)
        q = rms((x @ attn.q_proj.weight.T).view(2, 5, 4, 8), attn.q_norm.weight, 1e-6).transpose(1, 2)
        k = rms((x @ attn.k_proj.weight.T).view(2, 5, 2, 8), attn.k_norm.weight, 1e-6).transpose(1, 2)
        v = (x @ attn.v_proj.weight.T).view(2, 5, 2, 8).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # RoPE after the norm
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(8) + torch.full((5, 5), float("-inf")).triu(1)
        want = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32) @ attn.o_proj.weight.T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # normalised keys go into the cache: decoding token by token gives the same logits
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        full = lm(ids).logits
        out = lm(ids[:, :4], use_cache=True)
        step = [out.logits]
        for t in (4, 5):
            out = lm(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            step.append(out.logits)
    torch.testing.assert_close(torch.cat(step, 1), full, atol=1e-5, rtol=1e-5)


def test_qk_norm_is_off_by_default():
    assert LMConfig().qk_norm is False
    assert not [k for k in MiniMindLM(lm_tiny()).state_dict() if "q_norm" in k or "k_norm" in k]
    with pytest.raises(ConfigError, match="qk_norm"):
        LMConfig(qk_norm="yes")


def test_ln_mlp_projector_matches_formula():
    torch.manual_seed(0)
    proj = VisionProjector("ln_mlp", 24, 16)
    assert sorted(proj.state_dict()) == [f"mlp.{i}.{p}" for i in (0, 1, 3) for p in ("bias", "weight")]
    with torch.no_grad():
        proj.mlp[0].weight.uniform_(0.5, 1.5)
        proj.mlp[0].bias.normal_()
    x = torch.randn(2, 7, 24)
    ln, fc1, fc2 = proj.mlp[0], proj.mlp[1], proj.mlp[3]
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    h = (x - mean) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias  # LayerNorm, PyTorch's default eps
    h = h @ fc1.weight.T + fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU (nn.GELU's default)
    want = h @ fc2.weight.T + fc2.bias
    with torch.no_grad():
        torch.testing.assert_close(proj(x), want, atol=1e-5, rtol=1e-5)
    # inside a VLM the keys are minimind-3v's: vision_proj.mlp.{0,1,3}.*
    cfg = VLMConfig(lm=lm_tiny(), vision=vision_tiny(), projector_type="ln_mlp")
    keys = [k for k in MiniMindVLM(cfg).lm_state_dict() if k.startswith("vision_proj.")]
    assert sorted(keys) == [f"vision_proj.mlp.{i}.{p}" for i in (0, 1, 3) for p in ("bias", "weight")]
    with pytest.raises(ValueError, match="ln_mlp"):
        VisionProjector("ln_gelu", 24, 16)
