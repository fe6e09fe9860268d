"""The projector: the small bridge from the vision tower's width to the language model's width.

    image features (…, 196, 768) --projector--> image embeddings (…, 196, 512)

After projection an image patch "looks like" a word embedding to the decoder. Three kinds:
  linear      one Linear layer with bias (MiniMind-V, LLaVA-1)
  mlp2x_gelu  Linear -> GELU -> Linear (LLaVA-1.5)
  identity    nothing (widths must already agree)
  ln_mlp      LayerNorm -> Linear -> GELU -> Linear (minimind-3v, keys `mlp.{0,1,3}`)
"""

from __future__ import annotations

import torch
import torch.nn as nn


class VisionProjector(nn.Module):
    def __init__(self, kind: str, in_dim: int, out_dim: int):
        super().__init__()
        if kind == "linear":
            layers = [nn.Linear(in_dim, out_dim)]
        elif kind == "mlp2x_gelu":
            layers = [nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)]
        elif kind == "ln_mlp":
            layers = [nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)]
        elif kind == "identity":
            if in_dim != out_dim:
                raise ValueError(f"identity projector needs equal widths, got {in_dim} -> {out_dim}")
            layers = [nn.Identity()]
        else:
            raise ValueError(f"unknown projector type {kind!r} (linear, mlp2x_gelu, identity, ln_mlp)")
        self.kind = kind
        if kind == "ln_mlp":  # minimind-3v stores `vision_proj.mlp.{0,1,3}.*`: its name, kept
            self.mlp = nn.Sequential(*layers)
        else:
            # The attribute name doubles the prefix on purpose: MiniMind-V checkpoints store
            # `vision_proj.vision_proj.0.weight`, and we keep their names.
            self.vision_proj = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        layers = self.mlp if self.kind == "ln_mlp" else self.vision_proj
        return layers(features)  # (…, n, in_dim) -> (…, n, out_dim)
