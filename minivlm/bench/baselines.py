"""The models the benchmark runs: minivlm on random weights with inputs of the real shapes, and the
slower implementations it is measured against, as plain subclasses.

    LoopSpliceVLM     MiniMind-V's splice: a Python loop over samples and runs, torch.cat of slices
    FP32VisionTower   the CLIP tower in fp32 even inside an autocast region (MiniMind-V's precision)
    eager attention   no class needed: LMConfig.attn_impl = "eager" selects it in lm.py
    GivenFeatures     encode_images returns features computed beforehand, to time the splice alone

`variant(model, attn=..., splice=..., vision_fp32=...)` builds a model of these classes that holds
`model`'s very parameter tensors (shared, not copied). So every variant computes on identical numbers,
one optimizer steps them all, and memory holds one set of weights: a variant's peak memory is its own.
Random weights are enough: speed does not depend on their values, so nothing is downloaded.
`write_jsonl_dataset` makes the data section's input: JPEGs and a MiniMind-V jsonl in a folder.
"""

from __future__ import annotations

import copy
import json
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..model.config import vlm_preset
from ..model.vision import CLIPVisionModel
from ..model.vlm import MiniMindVLM


# ---------------------------------------------------------------------------------------------
# minivlm, and inputs for it


def build_model(preset: str, device: torch.device, seed: int = 0) -> MiniMindVLM:
    """A randomly initialised VLM of the preset (CLIP tower included), on device, in fp32."""
    torch.manual_seed(seed)
    return MiniMindVLM(vlm_preset(preset)).to(device)


def synthetic_batch(model: MiniMindVLM, batch: int, seq_len: int, device, seed: int = 0):
    """input_ids (B, seq_len) = one placeholder run + random text ids; labels = ids with the image
    positions set to -100 (as the datasets do); pixel_values (B, 1, 3, S, S) of random pixels."""
    L, V, pid = model.run_length, model.config.vocab_size, model.placeholder_id
    if seq_len <= L:
        raise SystemExit(f"error: --seq-len {seq_len} must exceed the image run of {L} placeholder tokens")
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, V, (batch, seq_len - L), generator=g)  # 0-2 are pad/bos/eos
    text[text == pid] = 3  # a stray placeholder id next to the run would break it
    ids = torch.cat([torch.full((batch, L), pid), text], dim=1)
    S = model.vlm_config.vision.image_size
    pixel_values = torch.randn(batch, 1, 3, S, S, generator=g)
    labels = ids.masked_fill(ids == pid, -100)
    return ids.to(device), labels.to(device), pixel_values.to(device)


# ---------------------------------------------------------------------------------------------
# The baselines


class LoopSpliceVLM(MiniMindVLM):
    """MiniMindVLM with MiniMind-V's splice (model_vlm.py: get_image_embeddings + count_vision_proj)."""

    def splice_images(self, input_ids, embeds, pixel_values, image_counts=None, image_features=None):
        """Like the original (which has no feature cache: image_features must be None): encode the images one slot at a time, find the runs by comparing every
        window of run_length ids with the placeholder pattern, turn the matches into Python
        (start, end) pairs with .item(), and rebuild each sample with torch.cat of slices in a loop.

        One fix: windows overlapping a run already replaced are skipped, so back-to-back images land
        where the vectorised version puts them (the original took the next matching window, one token
        after the first, and wrote the second image over most of the first).
        """
        assert image_features is None, "the baseline runs the vision tower"
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[:, None]
        B, N = pixel_values.shape[:2]
        T, L = input_ids.shape[1], self.run_length
        # (B, N, L, h): every slot is encoded, also the padding ones, as the original did.
        images = torch.stack([self.encode_images(pixel_values[:, i]) for i in range(N)], dim=1)
        if T < L:
            return embeds
        pattern = torch.full((L,), self.placeholder_id, device=input_ids.device)
        matches = (input_ids.unfold(1, L, 1) == pattern).all(dim=2)  # (B, T - L + 1)
        runs = {b: [(i.item(), i.item() + L - 1) for i in matches[b].nonzero(as_tuple=True)[0]]
                for b in range(B) if matches[b].any()}
        new_embeds = []
        for b in range(B):
            h = embeds[b]
            n_real = N if image_counts is None else int(image_counts[b])
            k, free_from = 0, 0
            for start, end in runs.get(b, []):
                if start < free_from or k >= n_real:
                    continue
                h = torch.cat((h[:start], images[b, k].to(h.dtype), h[end + 1:]), dim=0)[:T]
                k, free_from = k + 1, end + 1
            new_embeds.append(h)
        return torch.stack(new_embeds, dim=0)


class FP32VisionTower(CLIPVisionModel):
    """A CLIP tower that switches autocast off for itself: it runs in fp32 whatever the caller asked,
    as MiniMind-V's frozen tower does. The projector after it still runs under the caller's autocast."""

    def select_features(self, pixel_values, *args, **kwargs):
        with torch.autocast(pixel_values.device.type, enabled=False):
            return super().select_features(pixel_values.float(), *args, **kwargs)


class GivenFeatures:
    """Mixin: encode_images hands back `self.features`, set beforehand, instead of running the tower.
    Timing the splice with it leaves out the vision tower, which both splices would run alike and
    which would drown the difference."""

    features: torch.Tensor | None = None

    def encode_images(self, pixel_values):
        return self.features


class GivenFeaturesVLM(GivenFeatures, MiniMindVLM):
    """The vectorised splice of given features."""


class GivenFeaturesLoopVLM(GivenFeatures, LoopSpliceVLM):
    """The loop splice of given features."""


def rebuild_as(model: MiniMindVLM, cls: type[MiniMindVLM], attn: str = "sdpa",
               vision_cls: type[CLIPVisionModel] = CLIPVisionModel) -> MiniMindVLM:
    """A `cls` model (tower of `vision_cls`, attention `attn`) that holds `model`'s parameters.

    state_dict(keep_vars=True) yields the Parameter objects themselves and assign=True puts them in
    place of the fresh ones, so both models share weights, gradients' targets and optimizer state.
    assign keeps the receiving model's requires_grad flags, so they are copied over first.
    """
    cfg = copy.deepcopy(model.vlm_config)
    cfg.lm.attn_impl = attn
    with torch.device(model.lm_head.weight.device):  # built where the shared weights live
        twin = cls(cfg, vision_model=vision_cls(cfg.vision), placeholder_id=model.placeholder_id)
    for name, p in twin.named_parameters():
        p.requires_grad_(model.get_parameter(name).requires_grad)
    twin.load_state_dict(model.state_dict(keep_vars=True), assign=True)
    # The RoPE tables are buffers left out of the state dict (derived from the config): share them too.
    twin.model.freqs_cos, twin.model.freqs_sin = model.model.freqs_cos, model.model.freqs_sin
    return twin.train(model.training)


def variant(model: MiniMindVLM, attn: str = "sdpa", splice: str = "vectorised",
            vision_fp32: bool = False) -> MiniMindVLM:
    """`model` with baseline parts, sharing its parameters (see rebuild_as); `model` is left as is.

    attn: "sdpa" | "eager" (LMConfig.attn_impl). splice: "vectorised" | "loop" (LoopSpliceVLM).
    vision_fp32: the tower runs outside autocast (FP32VisionTower).
    """
    cls = {"vectorised": MiniMindVLM, "loop": LoopSpliceVLM}[splice]
    return rebuild_as(model, cls, attn, FP32VisionTower if vision_fp32 else CLIPVisionModel)


def write_jsonl_dataset(folder: str, n: int, size: int, seed: int = 0) -> str:
    """A MiniMind-V jsonl of n one-image conversations in folder; returns its path. The JPEGs hold a
    colour gradient, a few shapes and some noise: pure noise would be atypically slow to decode (JPEG
    compresses it badly); real photos sit between the two."""
    rng, rnd = np.random.default_rng(seed), random.Random(seed)
    words = "a red blue green small large square circle triangle on the left right of near picture".split()
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    jsonl = os.path.join(folder, "data.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for i in range(n):
            c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            pixels = c0 + (c1 - c0) * ramp[:, None, None] * ramp[None, :, None]  # diagonal gradient
            pixels += rng.normal(0, 8, pixels.shape)
            im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
            draw = ImageDraw.Draw(im)
            for _ in range(4):
                x0, y0 = rng.integers(0, size - 8, 2)
                x1, y1 = x0 + rng.integers(8, size // 2), y0 + rng.integers(8, size // 2)
                fill = tuple(int(v) for v in rng.integers(0, 256, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
            name = f"img_{i:05d}.jpg"
            im.save(os.path.join(folder, name), quality=90)
            answer = " ".join(rnd.choice(words) for _ in range(12)) + "."
            conv = [{"role": "user", "content": "<image>\nDescribe the picture."},
                    {"role": "assistant", "content": answer}]
            f.write(json.dumps({"conversations": conv, "image": name}) + "\n")
    return jsonl


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
