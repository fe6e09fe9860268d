"""MiniMind checkpoint layouts: recognising them and converting them to minivlm's names.

Two key layouts exist in the wild, and two model generations:
  2025-04 (minivlm's own names, = Llama's): model.embed_tokens.weight, model.layers.{i}.self_attn.q_proj...
  2025-02: tok_embeddings.weight, layers.{i}.attention.wq..., with *interleaved* RoPE; converting it
           needs a row permutation of wq/wk, see `convert_2025_02`.
  minimind-3v (2026) uses the 2025-04 names plus `self_attn.{q,k}_norm` and `vision_proj.mlp.*` (`is_3v`).
For a file without minivlm's JSON, `infer_lm_config` reads the decoder's config off the tensor shapes.
"""

from __future__ import annotations

import re

import torch

from .config import LMConfig, lm_3v_moe
from .weights import WeightsError

# Derived buffers some MiniMind versions saved; they are recomputed from the config, never loaded.
_DERIVED = re.compile(r"(^|\.)(mask|pos_cis|freqs_cos|freqs_sin)$")


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the output rows of wq/wk, inside each head, from interleaved RoPE pairs (0,1), (2,3), …
    to rotate-half pairs (0, d/2), (1, d/2+1), …: new row i = old 2i, new row d/2+i = old 2i+1."""
    out, inp = w.shape
    d = out // n_heads
    return w.view(n_heads, d // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def convert_2025_02(sd: dict, num_attention_heads: int = 8) -> dict:
    """Rename a 2025-02 state dict to the 2025-04 layout and fix its RoPE convention."""
    hidden = sd["tok_embeddings.weight"].shape[1]
    head_dim = hidden // num_attention_heads
    out = {}
    for k, v in sd.items():
        if _DERIVED.search(k):
            continue
        m = re.match(r"layers\.(\d+)\.(.+)$", k)
        if k == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = v
        elif k == "norm.weight":
            out["model.norm.weight"] = v
        elif k == "output.weight":
            out["lm_head.weight"] = v
        elif m:
            i, rest = m.groups()
            rest = (rest.replace("attention.wq", "self_attn.q_proj").replace("attention.wk", "self_attn.k_proj")
                    .replace("attention.wv", "self_attn.v_proj").replace("attention.wo", "self_attn.o_proj")
                    .replace("attention_norm", "input_layernorm").replace("ffn_norm", "post_attention_layernorm")
                    .replace("feed_forward.shared_experts.", "mlp.shared_experts.0.")
                    .replace("feed_forward.", "mlp.")
                    .replace("w1.", "gate_proj.").replace("w3.", "up_proj.").replace("w2.", "down_proj."))
            if rest == "self_attn.q_proj.weight":
                v = interleaved_to_half(v, num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                v = interleaved_to_half(v, v.shape[0] // head_dim)
            out[f"model.layers.{i}.{rest}"] = v
        else:
            out[k] = v  # vision_proj.* and anything unknown (reported later as unexpected)
    return out


def detect_layout(sd: dict) -> str:
    if "tok_embeddings.weight" in sd:
        return "2025-02"
    if "model.embed_tokens.weight" in sd:
        return "2025-04"
    raise WeightsError("no embedding matrix found (neither model.embed_tokens.weight nor tok_embeddings.weight): "
                       "not a MiniMind checkpoint")


def to_2025_04(sd: dict, num_attention_heads: int = 8) -> dict:
    """Any supported layout -> 2025-04 keys; derived buffers and CLIP keys dropped; tied head filled in."""
    if detect_layout(sd) == "2025-02":
        sd = convert_2025_02(sd, num_attention_heads)
    sd = {k: v for k, v in sd.items() if not _DERIVED.search(k) and not k.startswith("vision_encoder.")}
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied
    return sd


def file_is_tied(sd: dict) -> bool:
    """Whether a 2025-04 state dict's lm_head is its embedding matrix (MiniMind's) or a matrix of its own."""
    return torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])


def check_tying(sd: dict, tied: bool, source: str):
    if tied and not file_is_tied(sd):
        raise WeightsError(f"{source}: lm_head.weight differs from model.embed_tokens.weight, but the model "
                           f"ties them (tie_word_embeddings=True): a checkpoint of an untied model")


def is_3v(sd: dict) -> bool:
    """A minimind-3v checkpoint (LN+MLP projector `vision_proj.mlp.*`, QK-norm) rather than a MiniMind-V one."""
    return "vision_proj.mlp.0.weight" in sd or "model.layers.0.self_attn.q_norm.weight" in sd


def infer_lm_config(sd: dict, **overrides) -> LMConfig:
    """Read an LMConfig off the tensor shapes of a 2025-04 state dict. Heads default to MiniMind's 8; with
    QK-norm (minimind-3v) they are read off the norm's width (head_dim), and 3v's norms and MoE are taken."""
    vocab, hidden = sd["model.embed_tokens.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    experts = {int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.0\.mlp\.experts\.(\d+)\.", k))}
    shared = {int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", k))}
    ffn_key = "model.layers.0.mlp.experts.0.gate_proj.weight" if experts else "model.layers.0.mlp.gate_proj.weight"
    fields = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                  intermediate_size=sd[ffn_key].shape[0], use_moe=bool(experts))
    if is_3v(sd):  # what the shapes cannot say is taken from minimind-3v's preset
        moe = lm_3v_moe()
        fields.update(rms_norm_eps=moe.rms_norm_eps)
        if "model.layers.0.self_attn.q_norm.weight" in sd:
            fields.update(qk_norm=True, num_attention_heads=hidden // sd["model.layers.0.self_attn.q_norm.weight"].shape[0])
        if experts:
            fields.update(num_experts_per_tok=moe.num_experts_per_tok, aux_loss_alpha=moe.aux_loss_alpha,
                          moe_style=moe.moe_style)
    if experts:
        fields.update(n_routed_experts=len(experts), n_shared_experts=len(shared))
    fields.update(overrides)
    heads = fields.get("num_attention_heads", 8)
    fields.setdefault("num_key_value_heads", sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // (hidden // heads))
    return LMConfig(**fields)
