"""minivlm against reference outputs saved by `transformers` (see tests/fixtures/README.md)."""
import json
import os

import pytest
import torch

from minivlm.model.config import LMConfig
from minivlm.model.lm import MiniMindLM
from minivlm.data.processing import preprocess_image
from minivlm.model.vision import CLIPVisionModel
from minivlm.model.weights import WeightsError, read_safetensors, write_safetensors

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def ref(name):
    return torch.load(os.path.join(FIX, name), weights_only=True)


@pytest.fixture(scope="module")
def clip_ref():
    return ref("clip_tiny_ref.pt")


@pytest.mark.parametrize("folder", ["clip_tiny", "clip_tiny_vision_bin"])
def test_clip_vision_matches_reference(folder, clip_ref):
    model = CLIPVisionModel.from_pretrained(os.path.join(FIX, folder)).eval()
    px = clip_ref["pixel_values"].float()
    with torch.no_grad():
        out = model(px, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    torch.testing.assert_close(out.last_hidden_state, clip_ref["last_hidden_state"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(out.hidden_states), clip_ref["hidden_states"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, clip_ref["pooler_output"], atol=1e-5, rtol=1e-5)
    # feature selection: last layer minus CLS (MiniMind-V), layer -2 minus CLS (LLaVA), with CLS
    with torch.no_grad():
        torch.testing.assert_close(model.select_features(px), clip_ref["last_hidden_state"][:, 1:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.select_features(px, layer=-2), clip_ref["hidden_states"][1][:, 1:],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.select_features(px, layer=-2, feature="cls_patch"), clip_ref["hidden_states"][1],
                                   atol=1e-5, rtol=1e-5)


def test_clip_vision_config_read_from_folder():
    m = CLIPVisionModel.from_pretrained(os.path.join(FIX, "clip_tiny"))
    c = m.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size, c.num_patches) == (32, 2, 2, 16, 196)


def test_vit_b16_parameter_count():
    assert sum(p.numel() for p in CLIPVisionModel().parameters()) == 85_799_424


def test_clip_loader_names_bad_keys(tmp_path):
    src = os.path.join(FIX, "clip_tiny")
    sd = read_safetensors(os.path.join(src, "model.safetensors"))
    cfg = open(os.path.join(src, "config.json")).read()

    def folder(name, tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg)
        write_safetensors(tensors, d / "model.safetensors")
        return d

    missing = {k: v for k, v in sd.items() if "layers.1.mlp.fc2.bias" not in k}
    with pytest.raises(WeightsError, match=r"1 missing: vision_model.encoder.layers.1.mlp.fc2.bias"):
        CLIPVisionModel.from_pretrained(folder("missing", missing))
    extra = {**sd, "vision_model.encoder.layers.9.mlp.fc2.bias": torch.zeros(64)}
    with pytest.raises(WeightsError, match=r"1 unexpected: vision_model.encoder.layers.9.mlp.fc2.bias"):
        CLIPVisionModel.from_pretrained(folder("extra", extra))
    shaped = {**sd, "vision_model.post_layernorm.weight": torch.ones(65)}
    with pytest.raises(WeightsError, match=r"wrong shape: vision_model.post_layernorm.weight \(65,\)"):
        CLIPVisionModel.from_pretrained(folder("shape", shaped))
    with pytest.raises(WeightsError, match="no model.safetensors or pytorch_model.bin"):
        d = tmp_path / "empty"
        d.mkdir()
        (d / "config.json").write_text(cfg)
        CLIPVisionModel.from_pretrained(d)


def test_llama_weights_give_llama_logits():
    cfg = json.load(open(os.path.join(FIX, "llama_tiny_config.json")))
    lm = MiniMindLM(LMConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                             num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                             num_key_value_heads=cfg["num_key_value_heads"], intermediate_size=cfg["intermediate_size"],
                             rope_theta=cfg["rope_theta"], rms_norm_eps=cfg["rms_norm_eps"],
                             max_position_embeddings=cfg["max_position_embeddings"])).eval()
    lm.load_state_dict(torch.load(os.path.join(FIX, "llama_tiny.pth"), weights_only=True))
    r = ref("llama_tiny_ref.pt")
    with torch.no_grad():
        torch.testing.assert_close(lm(r["input_ids"]).logits, r["logits"], atol=1e-5, rtol=1e-5)
        out = lm(r["padded_input_ids"], attention_mask=r["padded_attention_mask"]).logits
    real = r["padded_attention_mask"].bool()
    torch.testing.assert_close(out[real], r["padded_logits_posids"][real], atol=1e-5, rtol=1e-5)


def test_preprocessing_matches_clip_image_processor():
    import numpy as np
    from PIL import Image
    r = ref("preprocess_ref.pt")
    mean, std = r["mean"].view(3, 1, 1), r["std"].view(3, 1, 1)
    assert len(r["crop_files"]) >= 6
    for name, crop_file in r["crop_files"].items():
        with Image.open(os.path.join(FIX, crop_file)) as c:  # HF's uint8 RGB crop, stored as a lossless PNG
            assert c.mode == "RGB" and c.size == (224, 224)
            crop_u8 = torch.from_numpy(np.array(c)).permute(2, 0, 1)
        expected = ((crop_u8.double() * (1 / 255)).float() - mean) / std  # the processor's own arithmetic
        with Image.open(os.path.join(FIX, "preprocess", name)) as im:
            im.load()
            got = preprocess_image(im)
        assert got.shape == (3, 224, 224) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0, msg=f"{name} ({r['modes'][name]})")


def test_safetensors_reader_all_dtypes():
    got = read_safetensors(os.path.join(FIX, "safetensors_dtypes.safetensors"))
    expected = ref("safetensors_dtypes_ref.pt")
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


def test_vision_only_folder_without_key_prefix_loads(tmp_path, clip_ref):
    sd = read_safetensors(os.path.join(FIX, "clip_tiny", "model.safetensors"))
    bare = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    (tmp_path / "config.json").write_text(open(os.path.join(FIX, "clip_tiny_vision_bin", "config.json")).read())
    write_safetensors(bare, tmp_path / "model.safetensors")
    with torch.no_grad():
        out = CLIPVisionModel.from_pretrained(tmp_path)(clip_ref["pixel_values"].float())
    torch.testing.assert_close(out.pooler_output, clip_ref["pooler_output"], atol=1e-5, rtol=1e-5)
