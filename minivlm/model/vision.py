"""The CLIP vision tower (ViT), written out by hand with the checkpoint's own parameter names.

    pixel_values (B, 3, 224, 224)
      -> patch_embedding: conv 16x16, stride 16        (B, 768, 14, 14) -> (B, 196, 768)
      -> prepend class_embedding, add position_embedding (B, 197, 768)
      -> pre_layrnorm (sic: the checkpoint spells it so)
      -> 12 pre-LayerNorm transformer layers            (B, 197, 768)
      -> post_layernorm, applied to the CLS token only  (B, 768)  = pooler_output

The VLM does not use the pooled vector: it takes one layer's per-patch features (B, 196, 768).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig, config_from_file
from ..common import atomic_write
from .weights import WeightsError, shapes_only, load_checked, load_state_dict, read_json, write_safetensors


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # The sigmoid approximation of GELU that the original CLIP weights were trained with.
    return x * torch.sigmoid(1.702 * x)


# "Learning Transferable Visual Models From Natural Language Supervision", Radford et al. 2021
class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(d))
        nn.init.normal_(self.class_embedding, std=0.02)
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype))  # (B, D, 14, 14)
        x = x.flatten(2).transpose(1, 2)  # (B, 196, D): patches in row-major order
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 197, D)
        return x + self.position_embedding.weight.to(x.dtype)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biases. `causal`/`attention_mask` serve CLIP's text tower."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, attn_mask=None, causal=False):
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, T, hd)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "quick_gelu"):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        if act == "quick_gelu":
            self.act = quick_gelu
        elif act == "gelu":
            self.act = F.gelu
        else:
            raise ValueError(f"unsupported CLIP activation {act!r}")

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, hidden_size, num_heads, intermediate_size, eps, act):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = CLIPAttention(hidden_size, num_heads)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, act)

    def forward(self, x, attn_mask=None, causal=False):
        x = x + self.self_attn(self.layer_norm1(x), attn_mask, causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, hidden_size, num_heads, intermediate_size, num_layers, eps, act):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(hidden_size, num_heads, intermediate_size, eps, act) for _ in range(num_layers))

    def forward(self, x, attn_mask=None, causal=False, output_hidden_states=False, stop_after=None):
        """Returns (last output, tuple of hidden states or None). `stop_after` = run only that many layers."""
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers[:stop_after]:
            x = layer(x, attn_mask, causal)
            if output_hidden_states:
                hidden_states.append(x)
        return x, (tuple(hidden_states) if output_hidden_states else None)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = CLIPEncoder(c.hidden_size, c.num_attention_heads, c.intermediate_size,
                                   c.num_hidden_layers, c.layer_norm_eps, c.hidden_act)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False,
                stop_after: int | None = None) -> "CLIPVisionOutput":
        """Shared by CLIPVisionModel and clip.CLIPModel, which both hold this module as `vision_model`.
        `stop_after` runs only that many encoder layers (a VLM needs none after the one it reads)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, 197, D)
        x, hidden_states = self.encoder(x, output_hidden_states=output_hidden_states, stop_after=stop_after)
        pooled = self.post_layernorm(x[:, 0]) if stop_after is None else None  # (B, D)
        return CLIPVisionOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states)


@dataclass
class CLIPVisionOutput:
    last_hidden_state: torch.Tensor  # (B, 197, D), last layer output, no post_layernorm
    pooler_output: torch.Tensor | None  # (B, D), post_layernorm(CLS of last layer); None if stopped early
    hidden_states: tuple | None = None  # num_layers + 1 tensors: encoder input, then each layer's output


class CLIPVisionModel(nn.Module):
    """CLIP's image encoder. Parameter names match Hugging Face's `vision_model.*` keys."""

    def __init__(self, config: VisionConfig | None = None):
        super().__init__()
        self.config = config or VisionConfig()
        self.vision_model = CLIPVisionTransformer(self.config)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> CLIPVisionOutput:
        return self.vision_model(pixel_values, output_hidden_states)

    def select_features(self, pixel_values: torch.Tensor, layer: int | None = None,
                        feature: str | None = None) -> torch.Tensor:
        """The features a VLM consumes: hidden state `layer` (default config.select_layer), with
        CLS dropped ("patch", (B, 196, D)) or kept ("cls_patch", (B, 197, D)).
        Layers after the selected one are never computed."""
        feature = feature or self.config.select_feature
        # The output after `index` layers is hidden_states[index].
        x = self.vision_model(pixel_values, stop_after=self._hidden_state_index(layer)).last_hidden_state
        return x[:, 1:] if feature == "patch" else x  # (B, 196, D) or (B, 197, D)

    def feature_modules(self) -> list[nn.Module]:
        """The modules select_features actually runs (no post_layernorm, no layers after the selected
        one): the ones worth training, and the only ones that receive gradients."""
        vm = self.vision_model
        return [vm.embeddings, vm.pre_layrnorm, *vm.encoder.layers[:self._hidden_state_index()]]

    def _hidden_state_index(self, layer: int | None = None) -> int:
        """Layer index (default config.select_layer, negative counts from the end) -> position in the
        num_layers + 1 hidden states = how many encoder layers must run."""
        layer = self.config.select_layer if layer is None else layer
        n = len(self.vision_model.encoder.layers)
        index = layer if layer >= 0 else n + 1 + layer
        if not 0 <= index <= n:
            raise ValueError(f"select layer {layer} is out of range for {n} layers")
        return index

    # ----------------------------------------------------------------------------------------
    # Loading a Hugging Face CLIP folder (full CLIPModel or vision-only CLIPVisionModel)

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype | None = None, **overrides) -> "CLIPVisionModel":
        """Load the tower of a Hugging Face CLIP folder, its weights in `dtype` (default float32).

        Memory: the module is built without its random initialisation (`shapes_only`: it would be
        overwritten anyway), only the vision tensors are read from the file, each converted
        to `dtype` as it is read, and they become the parameters themselves (assign=True): the peak
        is the tower's own size plus one tensor.
        """
        config = read_clip_config(folder, **overrides)
        with shapes_only():
            model = cls(config)
        # A full CLIPModel also holds the text tower and projections: never read, not ours to load.
        sd = read_clip_weights(folder, keys=lambda k: not k.startswith(_NOT_VISION), dtype=dtype or torch.float32)
        if "embeddings.patch_embedding.weight" in sd:  # newer vision-only saves drop the prefix
            sd = {f"vision_model.{k}": v for k, v in sd.items()}
        ours = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
        load_checked(model, ours, os.fspath(folder), assign=True)
        return model

    def save_pretrained(self, folder):
        """Write a Hugging Face-style vision-only folder (config.json + model.safetensors) that
        `from_pretrained` (ours or the reference implementation's) reads back."""
        os.makedirs(folder, exist_ok=True)
        c = self.config
        fields = {k: getattr(c, k) for k in _HF_VISION_DEFAULTS}
        cfg = {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"], **fields,
               "minivlm": {"select_layer": c.select_layer, "select_feature": c.select_feature}}
        atomic_write(os.path.join(folder, "config.json"), json.dumps(cfg, indent=2).encode())
        write_safetensors(dict(self.state_dict()), os.path.join(folder, "model.safetensors"), {"format": "pt"})



# Hugging Face's CLIPVisionConfig / CLIPTextConfig defaults, used for fields a config.json omits.
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5,
                           hidden_act="quick_gelu", projection_dim=512)


def read_config_json(folder) -> tuple[str, dict]:
    """(path, contents) of the `config.json` of a Hugging Face CLIP folder; WeightsError if it is missing."""
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: not found (is {folder} a Hugging Face CLIP folder?)")
    return path, read_json(path)


def read_clip_config(folder, **overrides) -> VisionConfig:
    """Read `config.json` of a Hugging Face CLIP folder (full or vision-only) into a VisionConfig."""
    path, raw = read_config_json(folder)
    sub = raw.get("vision_config") or raw  # a full CLIPModel nests it; a vision-only folder does not
    fields = {k: sub.get(k, v) for k, v in _HF_VISION_DEFAULTS.items()}
    fields["projection_dim"] = raw.get("projection_dim", fields["projection_dim"])
    fields.update(sub.get("minivlm", {}))  # feature selection saved by minivlm's save_pretrained
    fields.update(overrides)
    return config_from_file(VisionConfig, fields, path)  # patch_size 0, an unknown activation: named


# Keys of a full CLIP file that the vision tower never needs.
_NOT_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def clip_weights_file(folder) -> str:
    """The weights file of a Hugging Face CLIP folder: model.safetensors if present, else pytorch_model.bin."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(path := os.path.join(os.fspath(folder), name)):
            return path
    raise WeightsError(f"{folder}: no model.safetensors or pytorch_model.bin found (not a CLIP folder)")


def read_clip_weights(folder, keys=None, dtype=None) -> dict[str, torch.Tensor]:
    """The tensors of clip_weights_file(folder). keys / dtype: see weights.read_safetensors."""
    return load_state_dict(clip_weights_file(folder), keys, dtype)
