"""The SigLIP vision tower, written out by hand with the checkpoint's own parameter names.

SigLIP2's fixed-resolution checkpoints (e.g. SigLIP2 base, patch 32, 256 px, the tower of MiniMind-V's
2026 "minimind-3v") use this same architecture (SigLIP2's NaFlex variant, `Siglip2VisionModel`, does not):

    pixel_values (B, 3, 256, 256)   resized without a crop, scaled to [-1, 1] (mean = std = 0.5)
      -> patch_embedding: conv 32x32, stride 32, with bias   (B, 768, 8, 8) -> (B, 64, 768)
      -> add position_embedding (learned, one per patch)     (B, 64, 768)   no CLS token
      -> 12 pre-LayerNorm transformer layers (tanh GELU)     (B, 64, 768)
      -> post_layernorm on every token                       (B, 64, 768) = last_hidden_state

What differs from CLIP (vision.py): no class token and no pre-LayerNorm, a bias on the patch conv,
GELU's tanh approximation, LayerNorm eps 1e-6, and the final LayerNorm applied to all tokens. The files
also hold `vision_model.head.*`, an attention-pooling head that turns the 64 tokens into one vector for
the contrastive loss. A VLM reads the tokens, never that vector: the head is skipped when loading
(not read, not built) and not written when saving (config says vision_use_head false).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..common import atomic_write
from ..data.processing import SIGLIP_MEAN, SIGLIP_STD, squash_image
from .config import SiglipVisionConfig, config_from_file
from .vision import CLIPAttention
from .weights import WeightsError, shapes_only, load_checked, load_state_dict, read_json, write_safetensors


# "Sigmoid Loss for Language Image Pre-Training", Zhai et al. 2023 (SigLIP2: Tschannen et al. 2025)
class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        d = config.hidden_size
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=config.patch_size,
                                         stride=config.patch_size)  # with bias, unlike CLIP
        self.position_embedding = nn.Embedding(config.num_patches, d)  # no CLS: one per patch

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype))  # (B, D, 8, 8)
        x = x.flatten(2).transpose(1, 2)  # (B, 64, D): patches in row-major order
        return x + self.position_embedding.weight.to(x.dtype)


class SiglipMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x):
        # "gelu_pytorch_tanh": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), not the exact erf GELU.
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). The attention is CLIP's
    (q/k/v/out projections with biases, scale head_dim^-0.5, no mask)."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.self_attn = CLIPAttention(d, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = SiglipMLP(d, config.intermediate_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embeddings(pixel_values))  # (B, 64, D)
        return self.post_layernorm(x)  # (B, 64, D), every token (CLIP normalises only its CLS)


class SiglipVisionModel(nn.Module):
    """SigLIP's image encoder without its pooling head. Parameter names match Hugging Face's
    `vision_model.*` keys."""

    def __init__(self, config: SiglipVisionConfig | None = None):
        super().__init__()
        self.config = config or SiglipVisionConfig()
        self.vision_model = SiglipVisionTransformer(self.config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, 256, 256) -> last_hidden_state (B, 64, 768), after post_layernorm."""
        return self.vision_model(pixel_values)

    def select_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The features a VLM consumes (what MiniMind-V reads): every patch token of the last layer."""
        return self.vision_model(pixel_values)  # (B, 64, D)

    def feature_modules(self) -> list[nn.Module]:
        """The modules select_features runs: all of them (there is no pooling head to leave out)."""
        return [self.vision_model]

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype | None = None) -> "SiglipVisionModel":
        """Load the tower of a Hugging Face SigLIP / SigLIP2 folder (a full SiglipModel or a vision-only
        SiglipVisionModel), its weights in `dtype` (default float32). Built without initialisation and filled
        with the file's tensors (as CLIPVisionModel.from_pretrained). Skipped on purpose: the text tower,
        logit_scale / logit_bias and the pooling head `vision_model.head.*`; every other key must fit."""
        config = read_siglip_config(folder)
        with shapes_only():
            model = cls(config)
        sd = load_state_dict(siglip_weights_file(folder), keys=_is_tower_key, dtype=dtype or torch.float32)
        if "embeddings.patch_embedding.weight" in sd:  # vision-only saves of transformers 5 drop the prefix
            sd = {f"vision_model.{k}": v for k, v in sd.items()}
        load_checked(model, sd, os.fspath(folder), assign=True)
        return model

    def save_pretrained(self, folder):
        """Write a Hugging Face-style vision-only folder (config.json, preprocessor_config.json and
        model.safetensors, keys `vision_model.*`, no head) that `from_pretrained` (ours or the reference one) reads back."""
        os.makedirs(folder, exist_ok=True)
        fields = {k: getattr(self.config, k) for k in _HF_SIGLIP_DEFAULTS}
        cfg = {"model_type": "siglip_vision_model", "architectures": ["SiglipVisionModel"], **fields,
               "vision_use_head": False}
        atomic_write(os.path.join(folder, "config.json"), json.dumps(cfg, indent=2).encode())
        size = self.config.image_size
        prep = {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                "size": {"height": size, "width": size}, "resample": self.config.resample, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(SIGLIP_MEAN),
                "image_std": list(SIGLIP_STD), "do_convert_rgb": True}
        atomic_write(os.path.join(folder, "preprocessor_config.json"), json.dumps(prep, indent=2).encode())
        write_safetensors(dict(self.state_dict()), os.path.join(folder, "model.safetensors"), {"format": "pt"})


# Hugging Face's SiglipVisionConfig defaults (patch 16 at 224 px), used for fields a config.json omits.
_HF_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
                           hidden_act="gelu_pytorch_tanh")

# Keys of a SigLIP file that the tower never needs: the text tower, the loss's scale and bias.
_NOT_VISION = ("text_model.", "logit_scale", "logit_bias")


def _is_tower_key(key: str) -> bool:
    """A tensor of the tower: not the text side, not the pooling head (with or without `vision_model.`)."""
    return not key.startswith(_NOT_VISION) and not key.removeprefix("vision_model.").startswith("head.")


def read_siglip_config(folder) -> SiglipVisionConfig:
    """`config.json` of a SigLIP folder (full SiglipModel: its `vision_config`; vision-only: the top level)."""
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: not found (is {folder} a Hugging Face SigLIP folder?)")
    raw = read_json(path)
    sub = raw.get("vision_config") or raw
    if not isinstance(sub, dict):
        raise WeightsError(f"{path}: vision_config is a {type(sub).__name__}, not an object")
    fields = {k: sub.get(k, v) for k, v in _HF_SIGLIP_DEFAULTS.items()}
    if os.path.isfile(os.path.join(os.fspath(folder), "preprocessor_config.json")):
        prep = siglip_preprocess_settings(folder)
        if prep["size"] != fields["image_size"] or prep["mean"] != SIGLIP_MEAN or prep["std"] != SIGLIP_STD:
            raise WeightsError(f"{os.path.join(os.fspath(folder), 'preprocessor_config.json')}: size "
                               f"{prep['size']}, mean {prep['mean']}, std {prep['std']}: minivlm reads SigLIP "
                               f"images at the tower's image_size {fields['image_size']} with mean = std = 0.5")
        fields["resample"] = prep["resample"]
    else:
        fields["resample"] = int(Image.BICUBIC)  # what SiglipImageProcessor does without a config
    return config_from_file(SiglipVisionConfig, fields, path)


def siglip_weights_file(folder) -> str:
    """model.safetensors if present, else pytorch_model.bin."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(path := os.path.join(os.fspath(folder), name)):
            return path
    raise WeightsError(f"{folder}: no model.safetensors or pytorch_model.bin found (not a SigLIP folder)")


# ---------------------------------------------------------------------------------------------
# Preprocessing: Hugging Face's SiglipImageProcessor (PIL backend)

def siglip_preprocess(image: Image.Image, size: int = 256, resample: int = Image.BICUBIC,
                      mean=SIGLIP_MEAN, std=SIGLIP_STD) -> torch.Tensor:
    """A PIL image of any mode -> FloatTensor[3, size, size] as SiglipImageProcessor makes it
    (processing.squash_image). `resample` is a PIL filter number: 3 = bicubic (the processor's default),
    2 = bilinear (what SigLIP2 folders tend to set); siglip_preprocess_settings reads it from a folder."""
    return squash_image(image, size, resample, mean, std)


def siglip_preprocess_settings(folder) -> dict:
    """The siglip_preprocess keyword arguments a folder's `preprocessor_config.json` asks for (the
    processor's defaults for fields it omits; size from `size.height`, which must equal `size.width`)."""
    path = os.path.join(os.fspath(folder), "preprocessor_config.json")
    raw = read_json(path)
    size = raw.get("size", {"height": 224, "width": 224})
    if not isinstance(size, dict) or size.get("height") != size.get("width") or not isinstance(size.get("height"), int):
        raise WeightsError(f"{path}: size {size!r} is not a square {{'height': n, 'width': n}}")
    if raw.get("do_center_crop") or raw.get("rescale_factor", 1 / 255) != 1 / 255:
        raise WeightsError(f"{path}: a center crop or a rescale factor other than 1/255 is not supported")
    out = {"size": size["height"], "resample": raw.get("resample", Image.BICUBIC),
           "mean": tuple(raw.get("image_mean", SIGLIP_MEAN)), "std": tuple(raw.get("image_std", SIGLIP_STD))}
    if out["resample"] not in (0, 1, 2, 3, 4, 5) or len(out["mean"]) != 3 or len(out["std"]) != 3:
        raise WeightsError(f"{path}: resample / image_mean / image_std not understood")
    return out
