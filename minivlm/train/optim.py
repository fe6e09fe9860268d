"""What is trained and how fast: the freeze policy of each stage (`set_trainable`), AdamW parameter groups
with and without weight decay, and the warm-up + cosine learning-rate schedule. The VLM loop (`loop.py`)
and CLIP's (`minivlm/clip/train.py`) share the optimizer side.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from 1 down to `min_ratio` at `total`.

    With warmup 0 and min_ratio 0.1 this is MiniMind-V's `lr/10 + 0.5·lr·(1 + cos(π·step/total))`
    up to the factor 0.9 on the cosine, which makes the curve end exactly at lr/10.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * min(1.0, progress)))


def decays(name: str, p: torch.Tensor, embeddings: bool = False) -> bool:
    """Weight decay shrinks matrices only: norms, biases and the temperature are not "sizes" to pull
    towards zero. Position/class embeddings are excluded too unless `embeddings` is True."""
    if p.dim() < 2:
        return False
    module = name.split(".")[-2] if "." in name else ""
    return embeddings or "embedding" not in module


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float,
                 lr_of: dict[str, float] | None = None, decay_embeddings: bool = False) -> list[dict]:
    """AdamW groups for the trainable parameters: one per (learning rate, decay or not).

    `lr_of` maps a name prefix to its own learning rate (e.g. {"vision_encoder.": 5e-4}); every group
    remembers its peak rate as "base_lr", which the schedule multiplies each step.
    """
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group_lr = next((v for prefix, v in (lr_of or {}).items() if name.startswith(prefix)), lr)
        decay = decays(name, p, decay_embeddings)
        key = (group_lr, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "base_lr": group_lr}
        groups[key]["params"].append(p)
    return list(groups.values())


def set_lr(optimizer: torch.optim.Optimizer, factor: float):
    """Scale every group's peak rate by the schedule's factor for this step."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.01, vision_lr: float | None = None,
                   fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of a VLM: the vision tower may have its own rate.
    `fused` (one kernel for all parameters) is for CUDA."""
    lr_of = {"vision_encoder.": vision_lr} if vision_lr is not None else None
    groups = param_groups(model, weight_decay, lr, lr_of)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


def set_trainable(model, stage: str, train_lm_layers: int, train_vision: bool):
    """Freeze everything, then unfreeze what this stage trains."""
    model.requires_grad_(False)
    model.vision_proj.requires_grad_(True)
    if stage == "sft" or train_lm_layers < 0:
        model.model.requires_grad_(True)  # includes the embeddings (and, when tied, the output layer)
        model.lm_head.requires_grad_(True)  # an untied output layer lives outside model.model
    elif train_lm_layers > 0:
        for layer in model.model.layers[-train_lm_layers:]:
            layer.requires_grad_(True)
    if train_vision:
        for module in model.vision_encoder.feature_modules():
            module.requires_grad_(True)


def trainable_counts(model) -> dict:
    counts = {"vision": 0, "projector": 0, "lm": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = "vision" if name.startswith("vision_encoder.") else (
                "projector" if name.startswith("vision_proj.") else "lm")
            counts[part] += p.numel()
    return counts
