"""CLIP: an image tower and a text tower trained so that matching (image, caption) pairs point the same way.

    pixel_values (B, 3, S, S) --vision_model (vision.py)--> pooled CLS (B, Dv) --visual_projection--> (B, P)
    input_ids    (N, T)       --text_model (causal)-------> hidden at eos (N, Dt) --text_projection--> (N, P)
    both L2-normalised; logits_per_image = exp(logit_scale) * image_embeds @ text_embeds.T   (B, N)

Training (clip_loss) is a symmetric cross-entropy over a batch of B pairs: each image must pick its own
caption among the B captions (rows), and each caption its own image (columns). Zero-shot classification
(zero_shot) reuses the same score: write every label as a sentence and take a softmax over the images'
similarities to them.

Reading order of this file:
  1. TextConfig / CLIPConfig and the Hugging Face config.json fields
  2. CLIPTextTransformer (causal, pooled at the end-of-text token), CLIPTextModel
  3. CLIPModel: both towers, projections, from_pretrained / save_pretrained
  4. clip_loss
  5. tokenizers: load_clip_tokenizer, encode_texts
  6. zero_shot
  7. the synthetic world: captions, hard-negative batches, train(), evaluate()
  8. command line: classify / train / eval

Parameter names are Hugging Face's `CLIPModel` keys (REFERENCE §5: those of openai/clip-vit-base-patch16),
and what we save loads back in `CLIPVisionModel.from_pretrained`. One caveat for the reference
implementation: it would pool a model trained here with a minivlm tokenizer (eos id 2) at argmax instead
of at the first eos; see TextConfig.pooling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import synthetic as shapes
from .config import VisionConfig, vision_tiny
from .processing import ImageLoadError, load_image, preprocess_image
from .vision import (CLIPEncoder, CLIPVisionOutput, CLIPVisionTransformer, _HF_VISION_DEFAULTS,
                     read_clip_config, read_clip_weights)
from .weights import WeightsError, atomic_write, check_state_dict, write_safetensors

# ---------------------------------------------------------------------------------------------
# 1. Configuration

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # 2.6592: the paper's initial temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)  # the paper clips the scale at 100 so training cannot make logits explode


@dataclass
class TextConfig:
    """CLIP's text tower. Defaults are Hugging Face's CLIPTextConfig (= openai/clip-vit-base-patch16)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77  # CLIP's context length
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 512
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    # Which position is pooled (see CLIPTextTransformer.eos_positions):
    #   "first_eos": the first occurrence of eos_token_id in each row.
    #   "argmax":    input_ids.argmax(-1), the original OpenAI rule (eos 49407 is the largest id).
    #   "auto":      "argmax" when eos_token_id == 2, else "first_eos". Old Hub configs (openai's own)
    #                carry a wrong eos_token_id of 2, and Hugging Face falls back to argmax for them.
    pooling: str = "auto"

    def __post_init__(self):
        if self.pooling == "auto":
            self.pooling = "argmax" if self.eos_token_id == 2 else "first_eos"
        if self.pooling not in ("first_eos", "argmax"):
            raise ValueError(f"text pooling must be 'first_eos', 'argmax' or 'auto', got {self.pooling!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")


@dataclass
class CLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projection_dim: int = 512  # the joint embedding width; the authoritative copy (see from_pretrained)
    logit_scale_init_value: float = LOGIT_SCALE_INIT

    def __post_init__(self):
        # One number, three places in a Hub config.json: keep the sub-configs in step with ours.
        self.vision = dataclasses.replace(self.vision, projection_dim=self.projection_dim)
        self.text = dataclasses.replace(self.text, projection_dim=self.projection_dim)


_HF_TEXT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TextConfig) if f.name != "pooling"}


def _read_config_json(folder) -> dict:
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: not found (is {folder} a Hugging Face CLIP folder?)")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise WeightsError(f"{path}: invalid JSON ({e})") from None


def read_clip_model_config(folder) -> CLIPConfig:
    """config.json of a full Hugging Face CLIP folder -> CLIPConfig.

    Pitfall: the sub-configs of a Hub config.json carry their own `projection_dim` (often the unused
    default 512); the one the weights were made with is the top-level `projection_dim`.
    """
    raw = _read_config_json(folder)
    if not isinstance(raw.get("text_config"), dict):
        raise WeightsError(f"{os.path.join(os.fspath(folder), 'config.json')}: no text_config, so this is not a "
                           "full CLIP model (a vision-only folder loads with CLIPVisionModel.from_pretrained)")
    sub = raw["text_config"]
    text = {k: sub.get(k, v) for k, v in _HF_TEXT_DEFAULTS.items()}
    text.update(sub.get("minivlm", {}))  # the pooling rule saved by our save_pretrained
    vision = read_clip_config(folder, "vision")  # also takes the top-level projection_dim
    return CLIPConfig(vision=vision, text=TextConfig(**text),
                      projection_dim=raw.get("projection_dim", 512),
                      logit_scale_init_value=raw.get("logit_scale_init_value", LOGIT_SCALE_INIT))


# ---------------------------------------------------------------------------------------------
# 2. The text tower


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        # Learned absolute positions 0..T-1: texts are left-aligned (bos first), padding goes at the end.
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]  # (N, T, D)


@dataclass
class CLIPTextOutput:
    last_hidden_state: torch.Tensor  # (N, T, D), after final_layer_norm
    pooler_output: torch.Tensor  # (N, D), last_hidden_state at each row's end-of-text token
    hidden_states: tuple | None = None  # num_layers + 1 tensors, before final_layer_norm


# "Learning Transferable Visual Models From Natural Language Supervision", Radford et al. 2021, §2.4
class CLIPTextTransformer(nn.Module):
    """A GPT-2-style causal transformer; the text's vector is the hidden state at its end-of-text token.

    Why causal and why the last token: with a causal mask the eos token is the one position that has
    attended to every word of the text, so it can summarise all of it. It also makes padding harmless:
    pads come after eos, and nothing at or before eos can attend to them.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        c = self.config = config
        self.embeddings = CLIPTextEmbeddings(c)
        self.encoder = CLIPEncoder(c.hidden_size, c.num_attention_heads, c.intermediate_size,
                                   c.num_hidden_layers, c.layer_norm_eps, c.hidden_act)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N,) index of the token each row is pooled at.

        Rule: the first occurrence of eos_token_id. For OpenAI's vocabulary eos (49407) is the largest
        id, so this equals input_ids.argmax(-1), the rule of the original code; "argmax" pooling is kept
        for configs that state eos_token_id == 2 (see TextConfig.pooling). A row with no eos pools at
        position 0 (argmax of all-False), as the reference implementation does: always add eos.
        """
        if self.config.pooling == "argmax":
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> CLIPTextOutput:
        N, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"text of {T} tokens is longer than the {self.config.max_position_embeddings} "
                             "positions of the text tower (truncate with encode_texts)")
        x = self.embeddings(input_ids)  # (N, T, D)
        mask = None
        if attention_mask is not None:
            # Causal AND "key is a real token". The diagonal stays open so that a query whose keys are
            # all padding (e.g. left padding) still sees itself instead of producing NaN; such rows are
            # pad queries whose outputs are never used.
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
            keys = attention_mask.to(torch.bool)[:, None, None, :]  # (N, 1, 1, T)
            eye = torch.eye(T, dtype=torch.bool, device=x.device)
            mask = (causal & keys) | eye  # (N, 1, T, T): True = may attend
        x, hidden_states = self.encoder(x, attn_mask=mask, causal=True, output_hidden_states=output_hidden_states)
        x = self.final_layer_norm(x)  # (N, T, D)
        pooled = x[torch.arange(N, device=x.device), self.eos_positions(input_ids)]  # (N, D)
        return CLIPTextOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states)


class CLIPTextModel(nn.Module):
    """CLIP's text encoder alone. Parameter names match Hugging Face's `text_model.*` keys."""

    def __init__(self, config: TextConfig | None = None):
        super().__init__()
        self.config = config or TextConfig()
        self.text_model = CLIPTextTransformer(self.config)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextOutput:
        return self.text_model(input_ids, attention_mask, output_hidden_states)

    @classmethod
    def from_pretrained(cls, folder) -> "CLIPTextModel":
        """The text tower of a full Hugging Face CLIP folder (the rest of its weights is ignored)."""
        model = cls(read_clip_model_config(folder).text)
        sd = {k: v for k, v in read_clip_weights(folder).items() if k.startswith("text_model.")}
        _load_checked(model, sd, os.fspath(folder))
        return model


def _load_checked(model: nn.Module, state_dict: dict, source: str):
    """load_state_dict that names every missing / unexpected / mis-shaped key. Old checkpoints hold
    `*.position_ids` buffers (just arange(77) / arange(197)); we compute positions, so they are dropped."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    check_state_dict(model.state_dict(), sd, source)
    model.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# 3. The full model


@dataclass
class CLIPOutput:
    logits_per_image: torch.Tensor  # (B, N) exp(logit_scale) * cosine similarity
    logits_per_text: torch.Tensor  # (N, B) its transpose
    text_embeds: torch.Tensor  # (N, P), L2-normalised
    image_embeds: torch.Tensor  # (B, P), L2-normalised
    text_model_output: CLIPTextOutput | None = None
    vision_model_output: CLIPVisionOutput | None = None
    loss: torch.Tensor | None = None  # clip_loss, when return_loss=True (needs B == N)


# "Learning Transferable Visual Models From Natural Language Supervision", Radford et al. 2021
class CLIPModel(nn.Module):
    """Two towers and two bias-free linear maps into one joint space, plus a learned temperature."""

    def __init__(self, config: CLIPConfig | None = None):
        super().__init__()
        self.config = config or CLIPConfig()
        c = self.config
        self.vision_model = CLIPVisionTransformer(c.vision)  # shared with vision.py: same keys, same code
        self.text_model = CLIPTextTransformer(c.text)
        # No biases: the embeddings are normalised afterwards, and a bias would shift every vector
        # alike, which only blurs the cosine similarities.
        self.visual_projection = nn.Linear(c.vision.hidden_size, c.projection_dim, bias=False)
        self.text_projection = nn.Linear(c.text.hidden_size, c.projection_dim, bias=False)
        # log of the inverse temperature; a log so that it stays positive under gradient descent.
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init_value)))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """The reference implementation's initialisation (from_pretrained overwrites it).

        It matters for training from scratch: at init the CLS token barely sees the patches and all
        images embed almost alike (cosine ~0.9997). In our runs N(0, 0.02) everywhere then stayed at
        loss = ln(batch) (everything collapsed to one point), while this init, which scales by width^-0.5
        and depth, starts learning within a few dozen steps.
        """
        c = self.config
        for tower, cfg in ((self.vision_model, c.vision), (self.text_model, c.text)):
            d, n = cfg.hidden_size, cfg.num_hidden_layers
            in_std, out_std, fc_std = d ** -0.5 * (2 * n) ** -0.5, d ** -0.5, (2 * d) ** -0.5
            for layer in tower.encoder.layers:
                a, mlp = layer.self_attn, layer.mlp
                for lin, std in ((a.q_proj, in_std), (a.k_proj, in_std), (a.v_proj, in_std),
                                 (a.out_proj, out_std), (mlp.fc1, fc_std), (mlp.fc2, in_std)):
                    nn.init.normal_(lin.weight, std=std)
                    nn.init.zeros_(lin.bias)
        ve, te = self.vision_model.embeddings, self.text_model.embeddings
        nn.init.normal_(ve.class_embedding, std=c.vision.hidden_size ** -0.5)
        nn.init.normal_(ve.patch_embedding.weight, std=0.02)
        nn.init.normal_(ve.position_embedding.weight, std=0.02)
        nn.init.normal_(te.token_embedding.weight, std=0.02)
        nn.init.normal_(te.position_embedding.weight, std=0.01)
        nn.init.normal_(self.visual_projection.weight, std=c.vision.hidden_size ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=c.text.hidden_size ** -0.5)
        # LayerNorms keep PyTorch's ones / zeros.

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, P), not normalised (as the reference implementation returns them)."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T) -> (N, P), not normalised."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None, return_loss: bool = False) -> CLIPOutput:
        vision_out = self.vision_model(pixel_values)
        text_out = self.text_model(input_ids, attention_mask)
        image_embeds = F.normalize(self.visual_projection(vision_out.pooler_output), dim=-1)  # (B, P)
        text_embeds = F.normalize(self.text_projection(text_out.pooler_output), dim=-1)  # (N, P)
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()  # (N, B)
        loss = clip_loss(image_embeds, text_embeds, self.logit_scale) if return_loss else None
        return CLIPOutput(logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                          text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text_out,
                          vision_model_output=vision_out, loss=loss)

    # ----------------------------------------------------------------------------------------
    # Hugging Face folder layout

    @classmethod
    def from_pretrained(cls, folder) -> "CLIPModel":
        """A full Hugging Face CLIP folder: config.json (+ text_config / vision_config) and
        model.safetensors or pytorch_model.bin. Every key must fit (missing/unexpected keys are named)."""
        model = cls(read_clip_model_config(folder))
        _load_checked(model, read_clip_weights(folder), os.fspath(folder))
        return model

    def save_pretrained(self, folder, tokenizer=None):
        """Write config.json + model.safetensors (+ tokenizer.json if given) in the Hub layout.
        Both `CLIPModel.from_pretrained` and `vision.CLIPVisionModel.from_pretrained` read it back."""
        os.makedirs(folder, exist_ok=True)
        c = self.config
        vision = {k: getattr(c.vision, k) for k in _HF_VISION_DEFAULTS}
        vision.update(model_type="clip_vision_model",
                      minivlm={"select_layer": c.vision.select_layer, "select_feature": c.vision.select_feature})
        text = {k: getattr(c.text, k) for k in _HF_TEXT_DEFAULTS}
        # The pooling rule is explicit: a minivlm tokenizer has eos id 2, which the "auto" rule (like
        # the reference implementation) would read as a legacy config and pool at argmax instead.
        text.update(model_type="clip_text_model", minivlm={"pooling": c.text.pooling})
        cfg = {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": c.projection_dim,
               "logit_scale_init_value": c.logit_scale_init_value, "text_config": text, "vision_config": vision}
        atomic_write(os.path.join(folder, "config.json"), [json.dumps(cfg, indent=2).encode()])
        write_safetensors(dict(self.state_dict()), os.path.join(folder, "model.safetensors"), {"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(folder)


# ---------------------------------------------------------------------------------------------
# 4. The contrastive loss


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of B aligned pairs (row i of each input belongs together).

    logits[i, j] = exp(logit_scale) * cos(image i, text j)        (B, B)
    loss = (CE(logits, arange(B)) + CE(logits.T, arange(B))) / 2
    The first term asks each image to pick its caption among all B captions, the second each caption
    to pick its image; the other B - 1 entries of the batch are the negatives.
    """
    img = F.normalize(image_embeds, dim=-1)  # (B, P)
    txt = F.normalize(text_embeds, dim=-1)  # (B, P)
    scale = torch.as_tensor(logit_scale, dtype=img.dtype, device=img.device).exp()
    logits = scale * img @ txt.t()  # (B, B): rows are images, columns texts
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


# ---------------------------------------------------------------------------------------------
# 5. Tokenizers


class CLIPTokenizer:
    """A `tokenizers.Tokenizer` plus the three ids CLIP needs: bos, eos and pad.

    Two vocabularies are recognised:
      * OpenAI's CLIP (`tokenizer.json` of openai/clip-vit-*): `<|startoftext|>` / `<|endoftext|>`,
        padded with `<|endoftext|>` (as the Hub tokenizer pads).
      * minivlm's byte-level BPE (minivlm.tokenizer): `<|im_start|>` (1) / `<|im_end|>` (2), pad
        `<|endoftext|>` (0).
    """

    def __init__(self, hf_tokenizer, source="<in memory>"):
        from tokenizers import Tokenizer as _HF
        if not isinstance(hf_tokenizer, _HF):  # a minivlm.tokenizer.Tokenizer wraps one
            hf_tokenizer = getattr(hf_tokenizer, "_tok", hf_tokenizer)
        self._tok, self.source = hf_tokenizer, source
        # We add bos/eos, pad and truncate ourselves; a tokenizer.json may switch these on.
        self._tok.no_padding()
        self._tok.no_truncation()
        tid = self._tok.token_to_id
        if tid("<|startoftext|>") is not None and tid("<|endoftext|>") is not None:
            self.bos_id, self.eos_id, self.pad_id = tid("<|startoftext|>"), tid("<|endoftext|>"), tid("<|endoftext|>")
        elif tid("<|im_start|>") is not None and tid("<|im_end|>") is not None:
            self.bos_id, self.eos_id = tid("<|im_start|>"), tid("<|im_end|>")
            self.pad_id = tid("<|endoftext|>") if tid("<|endoftext|>") is not None else self.eos_id
        else:
            raise ValueError(f"{source}: no begin/end-of-text tokens (expected <|startoftext|>/<|endoftext|> "
                             "or <|im_start|>/<|im_end|>)")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without bos/eos."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, folder):
        os.makedirs(folder, exist_ok=True)
        self._tok.save(os.path.join(folder, "tokenizer.json"))


def load_clip_tokenizer(path) -> CLIPTokenizer:
    """`tokenizer.json`, or a folder holding one (a Hub CLIP folder, or one saved by `train`)."""
    from .tokenizer import read_tokenizer_json
    hf, file = read_tokenizer_json(path)
    return CLIPTokenizer(hf, source=file)


def encode_texts(tokenizer, texts: list[str], context_length: int = 77, pad_to_longest: bool = False):
    """Texts -> (input_ids (N, L), attention_mask (N, L)), each row `bos text eos pad...`.

    L = context_length, or the longest row when pad_to_longest (faster; the causal tower gives the same
    pooled vectors either way). Too-long texts are cut to context_length keeping eos as the last
    token, because eos is where the text is pooled.
    """
    tok = tokenizer if isinstance(tokenizer, CLIPTokenizer) else CLIPTokenizer(tokenizer)
    if isinstance(texts, str):
        texts = [texts]
    rows = [[tok.bos_id] + tok.encode(t)[:context_length - 2] + [tok.eos_id] for t in texts]
    L = max(len(r) for r in rows) if pad_to_longest else context_length
    input_ids = torch.full((len(rows), L), tok.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
        attention_mask[i, :len(r)] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------
# 6. Zero-shot classification


def _pixel_batch(images, size: int) -> torch.Tensor:
    """A (B, 3, S, S) tensor as is, or a list of PIL images preprocessed at the model's image size."""
    if isinstance(images, torch.Tensor):
        return images if images.dim() == 4 else images.unsqueeze(0)
    return torch.stack([preprocess_image(im, size) for im in images])


@torch.no_grad()
def zero_shot(model: CLIPModel, tokenizer, images, labels: list[str], template: str = "a photo of a {}"):
    """probs (N_images, N_labels): softmax over the labels of exp(logit_scale) * cos(image, template(label)).

    Each label becomes a sentence through `template` (the paper's prompt engineering: "a photo of a dog"
    matches captions better than the bare word "dog"); pass template="{}" for labels that already are
    sentences.
    """
    model.eval()
    device = next(model.parameters()).device
    pixels = _pixel_batch(images, model.config.vision.image_size).to(device)
    ids, mask = encode_texts(tokenizer, [template.format(l) for l in labels],
                             model.config.text.max_position_embeddings, pad_to_longest=True)
    out = model(ids.to(device), pixels, mask.to(device))
    return out.logits_per_image.softmax(dim=-1).cpu()  # (N_images, N_labels)


# ---------------------------------------------------------------------------------------------
# 7. Contrastive pretraining in the synthetic shapes world
#
# Captions come in several phrasings so that short labels ("a red circle") are in distribution for
# zero-shot use: by default size and position words are each dropped half the time (short=0.5).


def describe(scene, with_size=True, with_position=True) -> str:
    """A caption of the scene. With both flags this is synthetic.caption(scene)."""
    parts = []
    for o in scene.objects:
        words = o.phrase(with_size=with_size)
        p = f"{shapes.article(words)} {words}"
        parts.append(f"{p} {shapes.CELL_PHRASES[o.cell]}" if with_position else p)
    if len(parts) <= 1:
        return "".join(parts) or "nothing"
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# How often each kind of edit makes a hard negative: mostly shape, the attribute plain batches might
# avoid learning. (Tried: with 30% position edits the 2-layer ViT still did not learn position in 500
# steps, and single-object shape reached only 94% instead of 98-100%.)
EDIT_KINDS = {"shape": 0.5, "colour": 0.2, "position": 0.15, "size": 0.15}


def edit_scene(scene, kind: str, rng: random.Random):
    """A copy of the scene with one object's `kind` changed (shape, colour, size, or cell)."""
    objs = [dataclasses.replace(o) for o in scene.objects]
    i = rng.randrange(len(objs))
    o = objs[i]
    if kind == "shape":
        o.shape = rng.choice([s for s in shapes.SHAPES if s != o.shape])
    elif kind == "colour":
        o.colour = rng.choice([c for c in shapes.COLOUR_NAMES if c != o.colour])
    elif kind == "size":
        o.size = "small" if o.size == "large" else "large"
    elif kind == "position":
        o.cell = rng.choice([c for c in range(9) if c not in {p.cell for p in objs}])
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    return shapes.Scene(sorted(objs, key=lambda p: p.cell))  # captions list objects in reading order


def sample_batch(rng: random.Random, batch: int, hard_negatives: bool, group_size: int = 4, short: float = 0.5):
    """`batch` (scene, caption, render_seed) triples with pairwise different captions. `short`: the
    probability of leaving out the size words, and (independently) the position words, of a caption.

    Plain: independent random scenes. Two of them rarely share colours and positions, so in principle
    the task can be solved without looking at shape.
    Hard negatives: groups of `group_size` scenes, a base scene and copies of it with a single edit
    (EDIT_KINDS: mostly one object's shape), drawn on the same background with the same jitter. Within
    a group the captions differ in one word and the pixels in one object, so the loss can only be
    lowered by seeing that difference.

    Measured (500 steps x 64, seed 0, `eval` on 500 held-out scenes): both kinds of batch reach
    98-100% zero-shot on colour and on single-object shape, and 91-97% on the 2-3 object shape-swap
    test; neither learns position (chance). Plain batches do learn shape here: the tower never picks
    up position, so colour alone does not separate all scenes of a batch and shape is needed anyway.
    """
    out, seen = [], set()
    while len(out) < batch:
        base = shapes.sample_scene(rng)
        render_seed = rng.getrandbits(64)
        n = min(group_size, batch - len(out)) if hard_negatives else 1
        kinds = rng.choices(list(EDIT_KINDS), weights=list(EDIT_KINDS.values()), k=n - 1)
        # One phrasing per group; an edited attribute must be named or two captions would coincide.
        with_size = "size" in kinds or rng.random() >= short
        with_pos = "position" in kinds or rng.random() >= short
        group = [base]
        for kind in kinds:
            # A few tries to find an edit whose caption is new (a one-object scene has only one size
            # edit, for example); then a shape edit instead, of which there are always several.
            for k in [kind] * 5 + ["shape"] * 10:
                s = edit_scene(base, k, rng)
                if describe(s, with_size, with_pos) not in {describe(g, with_size, with_pos) for g in group}:
                    group.append(s)
                    break
        caps = [describe(s, with_size, with_pos) for s in group]
        if any(c in seen for c in caps):
            continue  # the same caption twice in a batch would be a contradictory target
        seen.update(caps)
        out.extend((s, c, render_seed) for s, c in zip(group, caps))
    return out


def render_batch(items, size: int) -> torch.Tensor:
    """(B, 3, size, size) normalised pixels; items sharing a render_seed share background and jitter."""
    return torch.stack([preprocess_image(shapes.render(s, size, random.Random(seed)), size)
                        for s, _, seed in items])


def caption_corpus(n_scenes: int = 3000, seed: int = 0) -> list[str]:
    """Texts to train a CLIP tokenizer on: captions of random scenes in every phrasing, plus the short
    phrases zero-shot labels use."""
    rng = random.Random(f"minivlm-clip/tokenizer/{seed}")
    texts = []
    for _ in range(n_scenes):
        s = shapes.sample_scene(rng)
        texts += [describe(s, a, b) for a in (True, False) for b in (True, False)]
    texts += [f"a photo of {shapes.article(c)} {c} {s}" for c in shapes.COLOUR_NAMES for s in shapes.SHAPES]
    return texts


def train_clip_tokenizer(texts: list[str], vocab_size: int = 400) -> CLIPTokenizer:
    """A minivlm byte-level BPE (minivlm.tokenizer.train_tokenizer) trained on the given texts."""
    from .tokenizer import train_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "captions.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for t in texts:  # train_tokenizer reads MiniMind-V conversations
                f.write(json.dumps({"conversations": [{"role": "user", "content": t}]}) + "\n")
        return CLIPTokenizer(train_tokenizer([path], vocab_size=vocab_size), source="trained tokenizer")


def small_config(vocab_size: int, vision_width=128, vision_layers=2, text_width=128, text_layers=2,
                 projection_dim=128, tokenizer: CLIPTokenizer | None = None) -> CLIPConfig:
    """A CPU-sized CLIP: the VLM's tiny ViT (96 px, patch 16) and a GPT-2-like text tower."""
    heads = lambda w: max(1, w // 32)  # head width 32
    vision = dataclasses.replace(vision_tiny(), hidden_size=vision_width, intermediate_size=4 * vision_width,
                                 num_hidden_layers=vision_layers, num_attention_heads=heads(vision_width))
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    text = TextConfig(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=4 * text_width,
                      num_hidden_layers=text_layers, num_attention_heads=heads(text_width),
                      pooling="first_eos", **ids)
    return CLIPConfig(vision=vision, text=text, projection_dim=projection_dim)


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


def train(out, steps=500, batch=64, seed=0, hard_negatives=False, group_size=4, short=0.5, lr=1e-3, warmup=None,
          weight_decay=0.05, tokenizer=None, vocab_size=400, vision_width=128, vision_layers=2,
          text_width=128, text_layers=2, projection_dim=128, log_every=25, eval_n=200, eval_every=0,
          device="cpu", log=print):
    """Contrastive pretraining on fresh synthetic scenes (nothing stored); saves the Hub folder layout
    (config.json, model.safetensors, tokenizer.json) to `out`. Returns (model, tokenizer, eval results)."""
    random.seed(seed)
    torch.manual_seed(seed)
    if tokenizer is None:
        tokenizer = train_clip_tokenizer(caption_corpus(seed=seed), vocab_size)
    elif not isinstance(tokenizer, CLIPTokenizer):
        tokenizer = load_clip_tokenizer(tokenizer)
    cfg = small_config(tokenizer.vocab_size, vision_width, vision_layers, text_width, text_layers,
                       projection_dim, tokenizer)
    model = CLIPModel(cfg).to(device)
    size, ctx = cfg.vision.image_size, cfg.text.max_position_embeddings
    n_params = sum(p.numel() for p in model.parameters())
    log(f"clip: {n_params / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, {steps} steps x batch {batch}, "
        f"hard negatives {'on (groups of %d)' % group_size if hard_negatives else 'off'}, short captions {short}")

    # Weight decay on matrices only: norms, biases, embeddings' positions and the temperature are not
    # "sizes" that should shrink.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20) if warmup is None else warmup

    def lr_at(step):  # linear warmup, then cosine down to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    t0, paused, loss_avg, acc_avg = time.time(), 0.0, None, None  # paused: time spent in evaluation
    for step in range(steps):
        rng = random.Random(f"minivlm-clip/train/{seed}/{step}")  # one stream per step: resumable, seedable
        items = sample_batch(rng, batch, hard_negatives, group_size, short)
        pixels = render_batch(items, size)  # (B, 3, S, S)
        ids, mask = encode_texts(tokenizer, [c for _, c, _ in items], ctx, pad_to_longest=True)  # (B, T)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out_ = model(ids.to(device), pixels.to(device), mask.to(device), return_loss=True)
        opt.zero_grad(set_to_none=True)
        out_.loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        # In-batch retrieval accuracy (image -> its caption): a readable companion to the loss.
        acc = (out_.logits_per_image.argmax(-1).cpu() == torch.arange(len(items))).float().mean().item()
        loss = out_.loss.item()
        loss_avg = loss if loss_avg is None else 0.9 * loss_avg + 0.1 * loss
        acc_avg = acc if acc_avg is None else 0.9 * acc_avg + 0.1 * acc
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.time() - t0
            rate = (step + 1) / max(el - paused, 1e-9)  # steps per second of training
            eta = (steps - step - 1) / rate
            log(f"step {step + 1:5d}/{steps}  loss {loss_avg:.3f}  batch acc {100 * acc_avg:5.1f}%  "
                f"scale {model.logit_scale.exp().item():5.1f}  lr {lr_at(step):.2e}  "
                f"{rate:.2f} step/s  elapsed {_fmt_time(el)}  ETA {_fmt_time(eta)}")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            # A quick learning curve on 100 held-out scenes (a few seconds; left out of the step rate).
            te = time.time()
            r = evaluate(model, tokenizer, n=100)
            model.train()
            paused += time.time() - te
            log(f"eval @ {step + 1}: " + "  ".join(f"{k} {100 * v['acc']:.0f}" for k, v in r.items()))
    model.eval().cpu()
    model.save_pretrained(out, tokenizer)
    log(f"saved {out} (config.json, model.safetensors, tokenizer.json) after {_fmt_time(time.time() - t0)}")
    results = None
    if eval_n:
        results = evaluate(model, tokenizer, n=eval_n)
        log(format_eval(results))
        with open(os.path.join(out, "zero_shot_eval.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return model, tokenizer, results


# --- zero-shot evaluation on held-out scenes ---
# Each task offers a scene a set of captions that differ in one attribute of one object, the rest being
# the truth: "colour" asks which of "a large red circle at the top", "a large green circle at the top",
# ... fits a large circle at the top. Full captions are in distribution for every --short-captions
# setting; "colour+shape (short)" uses the bare labels "a red circle", "a red square", ... (35 of them).
# On 2-3 object scenes the swap tasks are the binding test: the right attribute on the right object.

def _eval_tasks(scene, rng):
    i = rng.randrange(len(scene.objects))

    def variants(attr, values):  # full captions with object i's `attr` set to each value in turn
        labels = []
        for v in values:
            objs = [dataclasses.replace(p) for p in scene.objects]
            setattr(objs[i], attr, v)
            labels.append(describe(shapes.Scene(sorted(objs, key=lambda p: p.cell))))
        return labels, list(values).index(getattr(scene.objects[i], attr))

    if len(scene.objects) > 1:
        return {"shape swap (2-3 obj)": variants("shape", shapes.SHAPES),
                "colour swap (2-3 obj)": variants("colour", shapes.COLOUR_NAMES)}
    o = scene.objects[0]
    short = [f"{shapes.article(c)} {c} {s}" for c in shapes.COLOUR_NAMES for s in shapes.SHAPES]
    return {"colour": variants("colour", shapes.COLOUR_NAMES), "shape": variants("shape", shapes.SHAPES),
            "size": variants("size", shapes.SIZES), "position": variants("cell", range(9)),
            "colour+shape (short)": (short, short.index(f"{shapes.article(o.colour)} {o.colour} {o.shape}"))}


EVAL_EXAMPLES = {"colour": "a large {colour} circle at the top", "shape": "a large red {shape} at the top",
                 "size": "a {size} red circle at the top", "position": "a large red circle {where}",
                 "colour+shape (short)": "a {colour} {shape}",
                 "shape swap (2-3 obj)": "full caption, one shape changed",
                 "colour swap (2-3 obj)": "full caption, one colour changed"}


@torch.no_grad()
def evaluate(model: CLIPModel, tokenizer, n: int = 200, seed: int = 0) -> dict:
    """Zero-shot accuracy on n held-out single-object scenes and n held-out 2-3 object scenes
    (a separate random stream from training). Returns {task: {"correct", "total", "acc", "chance"}}."""
    model.eval()
    device = next(model.parameters()).device
    size, ctx = model.config.vision.image_size, model.config.text.max_position_embeddings
    scenes, seeds, tasks = [], [], []
    for i in range(2 * n):
        rng = random.Random(f"minivlm-clip/eval/{seed}/{i}")
        s = shapes.sample_scene(rng, max_objects=1) if i < n else shapes.sample_scene(rng, 3, 2)
        scenes.append(s)
        seeds.append(rng.getrandbits(64))
        tasks.append(_eval_tasks(s, rng))
    image_embeds = []
    for b in range(0, len(scenes), 100):
        px = render_batch([(s, None, r) for s, r in zip(scenes[b:b + 100], seeds[b:b + 100])], size)
        image_embeds.append(F.normalize(model.get_image_features(px.to(device)), dim=-1).cpu())
    image_embeds = torch.cat(image_embeds)  # (2n, P)
    texts = sorted({t for ts in tasks for labels, _ in ts.values() for t in labels})
    index = {t: k for k, t in enumerate(texts)}
    text_embeds = []
    for b in range(0, len(texts), 256):
        ids, mask = encode_texts(tokenizer, texts[b:b + 256], ctx, pad_to_longest=True)
        text_embeds.append(F.normalize(model.get_text_features(ids.to(device), mask.to(device)), dim=-1).cpu())
    text_embeds = torch.cat(text_embeds)  # (n_texts, P)
    results = {}
    for img, ts in zip(image_embeds, tasks):
        for task, (labels, truth) in ts.items():
            sims = text_embeds[[index[t] for t in labels]] @ img  # (n_labels,)
            r = results.setdefault(task, {"correct": 0, "total": 0, "chance": 1 / len(labels)})
            r["correct"] += int(sims.argmax().item() == truth)
            r["total"] += 1
    order = list(EVAL_EXAMPLES)
    results = {k: results[k] for k in order if k in results}
    for r in results.values():
        r["acc"] = r["correct"] / r["total"]
    return results


def format_eval(results: dict) -> str:
    head = f"{'task':<24}{'labels like':<37}{'acc %':>7}{'chance %':>10}{'n':>6}"
    lines = ["zero-shot accuracy on held-out synthetic scenes", head, "-" * len(head)]
    for task, r in results.items():
        lines.append(f"{task:<24}{EVAL_EXAMPLES.get(task, ''):<37}{100 * r['acc']:7.1f}"
                     f"{100 * r['chance']:10.1f}{r['total']:6d}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 8. Command line


class _CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _load_for_cli(model_dir, tokenizer_path=None):
    try:
        model = CLIPModel.from_pretrained(model_dir).eval()
    except (WeightsError, ValueError, OSError) as e:
        raise _CLIError(str(e)) from None
    try:
        tokenizer = load_clip_tokenizer(tokenizer_path or model_dir)
    except (ValueError, OSError) as e:
        raise _CLIError(str(e)) from None
    return model, tokenizer


def _cmd_classify(args):
    labels = [l.strip() for l in args.labels.split(",") if l.strip()]
    if len(labels) < 2:
        raise _CLIError(f"--labels needs at least two comma-separated labels, got {len(labels)}")
    model, tokenizer = _load_for_cli(args.model, args.tokenizer)
    try:
        images = [load_image(p) for p in args.images]
    except ImageLoadError as e:
        raise _CLIError(str(e)) from None
    probs = zero_shot(model, tokenizer, images, labels, template=args.template)  # (N_images, N_labels)
    for path, p in zip(args.images, probs):
        print(path)
        for k in p.argsort(descending=True).tolist():
            print(f"  {100 * p[k].item():6.2f}%  {labels[k]}")
    return 0


def _cmd_train(args):
    if args.steps < 1 or args.batch < 2:
        raise _CLIError("--steps must be >= 1 and --batch >= 2 (a contrastive batch needs negatives)")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = None
    if args.tokenizer:
        try:
            tokenizer = load_clip_tokenizer(args.tokenizer)
        except (ValueError, OSError) as e:
            raise _CLIError(str(e)) from None
    train(args.out, steps=args.steps, batch=args.batch, seed=args.seed, hard_negatives=args.hard_negatives,
          group_size=args.group_size, short=args.short_captions, lr=args.lr, tokenizer=tokenizer,
          vocab_size=args.vocab_size, vision_width=args.vision_width, vision_layers=args.vision_layers, text_width=args.text_width,
          text_layers=args.text_layers, projection_dim=args.projection_dim, log_every=args.log_every,
          eval_n=args.eval_n, eval_every=args.eval_every, device=args.device, log=lambda m: print(m, flush=True))
    return 0


def _cmd_eval(args):
    model, tokenizer = _load_for_cli(args.model, args.tokenizer)
    results = evaluate(model, tokenizer, n=args.n, seed=args.seed)
    print(format_eval(results))
    if args.json:
        print(json.dumps(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minivlm.clip", description="CLIP: zero-shot classification, "
                                "contrastive pretraining on the synthetic shapes world, and its evaluation.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("classify", help="zero-shot label probabilities for images")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--model", required=True, metavar="FOLDER", help="Hugging Face CLIP folder (with tokenizer.json)")
    c.add_argument("--labels", required=True, help='comma-separated, e.g. "a dog,a cat,a diagram"')
    c.add_argument("--template", default="{}", help='sentence around each label, e.g. "a photo of {}" (default: as is)')
    c.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or folder (default: the model folder's)")
    c.set_defaults(func=_cmd_classify)

    t = sub.add_parser("train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="contrastive pretraining on synthetic captions rendered on the fly")
    t.add_argument("--out", required=True, metavar="DIR", help="output folder (Hub layout + tokenizer.json)")
    t.add_argument("--steps", type=int, default=500, help="optimizer steps, each on fresh scenes")
    t.add_argument("--batch", type=int, default=64, help="image-caption pairs per step")
    t.add_argument("--seed", type=int, default=0, help="seeds the weights, the scenes and the tokenizer corpus")
    t.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=False,
                   help="batches of scene groups that differ in one attribute (mostly one object's shape); "
                        "measured: no better than plain batches at 500 steps (see README)")
    t.add_argument("--group-size", type=int, default=4, help="scenes per hard-negative group")
    t.add_argument("--short-captions", type=float, default=0.5, metavar="P",
                   help="probability of dropping the size words, and the position words, of a caption "
                        "(0: always full captions)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (warmup, cosine to 10%%)")
    t.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or folder (default: train one on captions)")
    t.add_argument("--vocab-size", type=int, default=400, help="vocabulary of the trained tokenizer")
    t.add_argument("--vision-width", type=int, default=128, help="ViT width (96 px, patch 16, heads of 32)")
    t.add_argument("--vision-layers", type=int, default=2, help="ViT layers")
    t.add_argument("--text-width", type=int, default=128, help="text transformer width")
    t.add_argument("--text-layers", type=int, default=2, help="text transformer layers")
    t.add_argument("--projection-dim", type=int, default=128, help="joint embedding width")
    t.add_argument("--log-every", type=int, default=25, help="steps between progress lines")
    t.add_argument("--eval-n", type=int, default=200, help="held-out scenes per eval group at the end (0: skip)")
    t.add_argument("--eval-every", type=int, default=0, help="also evaluate on 100 scenes every N steps (0: off)")
    t.add_argument("--device", default="cpu", help="cpu, cuda, ... (scenes are always drawn on the CPU)")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="zero-shot accuracy table on held-out synthetic scenes")
    e.add_argument("--model", required=True, metavar="DIR")
    e.add_argument("--tokenizer", metavar="PATH")
    e.add_argument("--n", type=int, default=200, help="scenes per group (single-object, 2-3 objects)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    e.set_defaults(func=_cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
