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
  4. clip_loss    5. tokenizers: load_clip_tokenizer, encode_texts    6. zero_shot
Training in the shapes world, its evaluation and the command line (python -m minivlm.clip) are clip_train.py.

Parameter names are Hugging Face's `CLIPModel` keys (those of openai/clip-vit-base-patch16),
and what we save loads back in `CLIPVisionModel.from_pretrained`. One caveat for the reference
implementation: it would pool a model trained here with a minivlm tokenizer (eos id 2) at argmax instead
of at the first eos; see TextConfig.pooling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common import atomic_write
from ..model.config import VisionConfig
from ..data.processing import preprocess_image
from ..model.vision import (CLIPEncoder, CLIPVisionOutput, CLIPVisionTransformer, _HF_VISION_DEFAULTS,
                     read_clip_config, read_clip_weights, read_config_json)
from ..model.weights import WeightsError, load_checked, write_safetensors

# ---------------------------------------------------------------------------------------------
# 1. Configuration

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # 2.6592: the paper's initial temperature 0.07


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


def read_clip_model_config(folder) -> CLIPConfig:
    """config.json of a full Hugging Face CLIP folder -> CLIPConfig.

    Pitfall: the sub-configs of a Hub config.json carry their own `projection_dim` (often the unused
    default 512); the one the weights were made with is the top-level `projection_dim`.
    """
    path, raw = read_config_json(folder)
    if not isinstance(raw.get("text_config"), dict):
        raise WeightsError(f"{path}: no text_config, so this is not a full CLIP model "
                           "(a vision-only folder loads with CLIPVisionModel.from_pretrained)")
    sub = raw["text_config"]
    text = {k: sub.get(k, v) for k, v in _HF_TEXT_DEFAULTS.items()}
    text.update(sub.get("minivlm", {}))  # the pooling rule saved by our save_pretrained
    vision = read_clip_config(folder)  # also takes the top-level projection_dim
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
        load_checked(model, sd, os.fspath(folder))
        return model


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
        load_checked(model, read_clip_weights(folder), os.fspath(folder))
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
        atomic_write(os.path.join(folder, "config.json"), json.dumps(cfg, indent=2).encode())
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
        os.makedirs(folder, exist_ok=True)  # whole or not at all, like minivlm's own tokenizer
        atomic_write(os.path.join(folder, "tokenizer.json"), self._tok.to_str(pretty=True).encode())


def load_clip_tokenizer(path) -> CLIPTokenizer:
    """`tokenizer.json`, or a folder holding one (a Hub CLIP folder, or one saved by `train`)."""
    from ..data.tokenizer import read_tokenizer_json
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

