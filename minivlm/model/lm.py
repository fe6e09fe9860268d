"""The MiniMind language model: a Llama-style decoder, written out by hand.

    input_ids (B, T) --embed_tokens--> (B, T, 512)
      -> 8 x [ x + Attention(RMSNorm(x)) ; x + FeedForward(RMSNorm(x)) ]
           Attention: grouped-query (8 query heads share 2 key/value heads), RoPE on q and k
           FeedForward: SwiGLU, or a mixture of experts
      -> RMSNorm -> lm_head (tied to embed_tokens) --> logits (B, T, 6400)

Parameter names are those of MiniMind's 2025-04 checkpoints (which are Llama's names), so
`MiniMindLM(cfg).load_state_dict(torch.load("...pth", weights_only=True))` works and gives the same logits as Llama.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LMConfig


# "Root Mean Square Layer Normalization", Zhang & Sennrich 2019
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # float32 inside: in bf16/fp16 the mean of squares loses too many digits.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# "RoFormer: Enhanced Transformer with Rotary Position Embedding", Su et al. 2021
def rope_tables(head_dim: int, max_positions: int, theta: float):
    """cos/sin tables (max_positions, head_dim) in the rotate-half layout: [freqs, freqs]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions).float(), inv_freq)  # (max_positions, head_dim / 2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (max_positions, head_dim)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    # Rotates pair (i, i + head_dim/2) of each head by angle position * inv_freq[i]. After this,
    # q·k depends only on the distance between the two positions.
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of past tokens, one preallocated buffer (B, n_kv, capacity, head_dim) per layer.

    New tokens are written in place; when the buffer is full its capacity doubles, so appending a token
    costs O(1) amortised instead of re-concatenating the whole cache every step.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0  # tokens already stored (the same for every layer)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, n_kv, T, hd) after the cached ones; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if layer == len(self.keys):  # first call for this layer
            self.keys.append(k.new_empty(*k.shape[:2], end, k.shape[3]))
            self.values.append(v.new_empty(*v.shape[:2], end, v.shape[3]))
        elif end > self.keys[layer].shape[2]:  # full: double the capacity
            for buf in (self.keys, self.values):
                old = buf[layer]
                new = old.new_empty(*old.shape[:2], max(end, 2 * old.shape[2]), old.shape[3])
                new[:, :, :start] = old[:, :, :start]
                buf[layer] = new
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int):
        self.length += n


def take(x, rows):
    """x (B, ..., T, d) -> (B, ..., N, d): the positions rows (B, N) of each sample (x may broadcast over B)."""
    x = x.expand(rows.shape[0], *x.shape[1:])
    index = rows.view(rows.shape[0], *[1] * (x.dim() - 3), rows.shape[1], 1)
    return x.gather(-2, index.expand(*x.shape[:-2], rows.shape[1], x.shape[-1]))


def repeat_kv(x, n_rep: int):
    """(B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    B, n_kv, T, hd = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, T, hd).reshape(B, n_kv * n_rep, T, hd)


# "GQA: Training Generalized Multi-Query Transformer Models", Ainslie et al. 2023
class Attention(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            # "Qwen3 Technical Report", Yang et al. 2025: an RMSNorm (fp32 inside) over each head's vector
            # keeps the q·k logits from growing with the weights. Shared by all heads: head_dim weights.
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, output_attentions=False, rows=None):
        """mask: None = plain causal, else bool (B or 1, 1, T, T_past + T), True = may attend.
        rows (B, N): only these positions ask (keys and values still come from all T); mask is then
        (B, 1, N, T) and the output (B, N, h). Training uses it where only a few outputs are read."""
        B, T, _ = x.shape
        xq, cos_q, sin_q = (x, cos, sin) if rows is None else (take(x, rows), take(cos, rows), take(sin, rows))
        Tq = xq.shape[1]
        q, k, v = self.q_proj(xq), self.k_proj(x), self.v_proj(x)
        q = q.view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, hd)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # over head_dim, before RoPE
        q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, KV, T_past + T, hd)
        p = self.dropout if self.training else 0.0
        if T == 1 and self.attn_impl == "sdpa" and not output_attentions:
            # Decoding one token: the n_rep query heads that share a key/value head become n_rep query
            # rows of that head, so the cache is read in place instead of copied n_rep times per step.
            q = q.reshape(B, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # a lone query sees all keys
            return self.o_proj(y.reshape(B, 1, -1)), None
        k, v = repeat_kv(k, self.n_heads // self.n_kv), repeat_kv(v, self.n_heads // self.n_kv)
        weights = None
        if self.attn_impl == "eager" or output_attentions:
            # softmax(q k^T / sqrt(hd)) v, by hand: slower, but the weights can be returned.
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, Tq, T_k)
            if mask is None:
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            scores = scores.masked_fill(~mask, float("-inf"))
            weights = F.softmax(scores.float(), dim=-1).to(q.dtype)
            y = F.dropout(weights, p) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
        y = y.transpose(1, 2).reshape(B, Tq, -1)  # (B, Tq, H * hd)
        return self.o_proj(y), weights


# "GLU Variants Improve Transformer", Shazeer 2020
class FeedForward(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# "DeepSeekMoE: Towards Ultimate Expert Specialization", Dai et al. 2024 (routed + shared experts)
class MoEGate(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.style = config.moe_style
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        """x (B, T, h) -> expert ids (B*T, k), their weights (B*T, k), auxiliary loss (scalar)."""
        B, T, h = x.shape
        scores = F.linear(x.reshape(-1, h), self.weight).softmax(dim=-1)  # (B*T, E)
        topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob and (self.top_k > 1 or self.style == "minimind-3v"):
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux_loss = scores.new_zeros(())
        if self.training and self.alpha > 0 and self.style == "minimind-3v":
            # Over the whole batch: (share of picks per expert) x (its mean score) x E; 1.0 x alpha when even.
            load = F.one_hot(topk_idx, self.n_experts).float().mean(dim=0)  # (k, E)
            aux_loss = (load * scores.mean(dim=0)).sum() * self.n_experts * self.alpha
        elif self.training and self.alpha > 0:
            # Per sequence: (how often each expert was picked, relative to uniform) x (its mean score).
            # Minimal when load is spread evenly; its gradient flows through the scores.
            picks = scores.new_zeros(B, self.n_experts)
            picks.scatter_add_(1, topk_idx.view(B, -1), scores.new_ones(B, T * self.top_k))
            picks = picks / (T * self.top_k / self.n_experts)  # (B, E), 1.0 = uniform load
            aux_loss = (picks * scores.view(B, T, -1).mean(dim=1)).sum(dim=1).mean() * self.alpha
        return topk_idx, topk_weight, aux_loss


class MoEFeedForward(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))
        self.aux_loss = None  # set by forward, summed by the model

    def forward(self, x):
        B, T, h = x.shape
        topk_idx, topk_weight, self.aux_loss = self.gate(x)
        flat = x.reshape(-1, h)  # (N, h), N = B*T
        k = topk_idx.shape[1]
        # Dispatch: sort the N*k (token, expert) pairs by expert, then one batched call per expert.
        expert_of = topk_idx.reshape(-1)  # (N*k,)
        token_of = torch.arange(flat.shape[0], device=x.device).repeat_interleave(k)
        weight_of = topk_weight.reshape(-1)
        order = torch.argsort(expert_of, stable=True)
        counts = torch.bincount(expert_of, minlength=len(self.experts)).tolist()
        y = torch.zeros_like(flat)
        for expert, tokens, w in zip(self.experts, token_of[order].split(counts), weight_of[order].split(counts)):
            if tokens.numel():
                y.index_add_(0, tokens, expert(flat[tokens]) * w[:, None].to(flat.dtype))
        y = y.view(B, T, h)
        for shared in self.shared_experts:
            y = y + shared(x)
        return y


class MiniMindBlock(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, output_attentions=False, rows=None):
        h, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, output_attentions, rows)
        x = (x if rows is None else take(x, rows)) + h  # (B, T or N, h)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, weights


class MiniMindModel(nn.Module):
    """Embeddings + blocks + final norm (the `model.` prefix of the checkpoint keys)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(MiniMindBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        # Not persistent: derived from the config, never stored in checkpoints.
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # None when training asked for the loss alone (return_logits=False)
    past_key_values: KVCache | None = None
    aux_loss: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    attentions: tuple | None = None  # per layer (B, H, T, T_k), only with output_attentions=True


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token t predicts token t+1: compare logits[:, :-1] with labels[:, 1:], skipping -100."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


def labelled_rows(labels: torch.Tensor):
    """The positions whose output the loss reads (those followed by a label), per sample, in order:
    rows (B, N), padded with position 0, and valid (B, N); N = the most labels in one sample."""
    wanted = labels[:, 1:] != -100  # (B, T-1)
    counts = wanted.sum(dim=1)  # (B,)
    n = int(counts.max())
    rows = torch.argsort((~wanted).to(torch.int8), dim=1, stable=True)[:, :n]  # labelled positions first
    valid = torch.arange(n, device=labels.device)[None] < counts[:, None]
    return rows.masked_fill(~valid, 0), valid


def rows_mask(rows: torch.Tensor, attention_mask, T: int) -> torch.Tensor:
    """The causal (and key padding) mask of queries at rows (B, N) over T keys: (B, 1, N, T)."""
    mask = torch.arange(T, device=rows.device)[None, None, :] <= rows[:, :, None]  # (B, N, T)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    return (mask | ~mask.any(dim=-1, keepdim=True))[:, None]  # no row with nothing to attend to


def build_attention_mask(attention_mask, past_len: int, T: int, device):
    """One boolean mask (B, 1, T, past_len + T) combining causality and key padding, or None when a
    plain causal mask suffices (no padding, no cache) so the fused causal kernels can be used."""
    if attention_mask is None and past_len == 0:
        return None
    Tk = past_len + T
    q_pos = torch.arange(past_len, Tk, device=device)
    mask = (torch.arange(Tk, device=device)[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, Tk)
    if attention_mask is not None:
        if attention_mask.shape[-1] != Tk:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected "
                             f"{Tk} (cached {past_len} + new {T})")
        mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, Tk)
        # A query with nothing to attend to (a padding position) would softmax over all -inf = NaN.
        # Let such rows attend everywhere instead: their outputs are ignored anyway.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


class MiniMindLM(nn.Module):
    def __init__(self, config: LMConfig | None = None):
        super().__init__()
        self.config = config = config or LMConfig()
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # tied: one matrix reads and writes tokens
        self.apply(self._init_weights)
        if not config.tie_word_embeddings:
            # Untied, the embeddings only feed the residual stream, so they start at unit scale (torch's
            # own nn.Embedding default) instead of an output matrix's 0.02. Measured on the shapes world:
            # with 0.02-scale embeddings (tied or not) a decoder trained from scratch soon carries at the
            # answer position a large constant (the answer prior, with no bias to hold it) next to which
            # the context is ~0.3 % of the state, and "Is there a red star?" about one object stays at
            # chance for thousands of steps; untied at unit scale it reaches 70-90 % within 500-750.
            nn.init.normal_(self.model.embed_tokens.weight, mean=0.0, std=1.0)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=False,
                inputs_embeds=None, logits_to_keep=0, position_ids=None, labels=None,
                output_attentions=False, return_logits=True, labelled_last_block=True) -> LMOutput:
        """input_ids (B, T) or inputs_embeds (B, T, h). attention_mask (B, T_past + T): 1 = real token.
        logits_to_keep=n computes logits for the last n positions only (0 = all). With labels,
        return_logits=False skips the logits of unlabelled positions (training: logits is then None), and
        with labelled_last_block also the last block's work there (same loss, other float rounding)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, h)
        B, T, _ = x.shape
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past_len = cache.length if cache is not None else 0

        if position_ids is None:
            if attention_mask is not None:  # left padding: count positions from each row's first token
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=x.device)[None]
        if past_len + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past_len + T} tokens exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        cos = self.model.freqs_cos[position_ids].to(x.dtype)[:, None]  # (B or 1, 1, T, hd)
        sin = self.model.freqs_sin[position_ids].to(x.dtype)[:, None]
        mask = build_attention_mask(attention_mask, past_len, T, x.device)

        # Training for the loss alone: the last block's output is read only where a label waits (in VLM
        # training a small share: the image runs, prompts and padding carry none), so that block makes its
        # queries, attention output and MLP there only; its keys and values still cover every position.
        # Not with MoE: the router's auxiliary loss is defined over all positions.
        loss_only = labels is not None and not return_logits
        rows, valid = labelled_rows(labels) if loss_only else (None, None)  # where the loss reads the output
        last_at_rows = loss_only and rows.shape[1] > 0 and labelled_last_block and not output_attentions \
            and cache is None and not self.config.use_moe
        x = self.model.dropout(x)
        attentions = []
        for i, layer in enumerate(self.model.layers):
            if last_at_rows and i == len(self.model.layers) - 1:
                x, w = layer(x, cos, sin, rows_mask(rows, attention_mask, T), None, i, False, rows)  # (B, N, h)
            else:
                x, w = layer(x, cos, sin, mask, cache, i, output_attentions)
            attentions.append(w)
        if cache is not None:
            cache.advance(T)
        x = self.model.norm(x)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        if self.config.use_moe:
            aux_loss = sum(layer.mlp.aux_loss for layer in self.model.layers)
        if loss_only:
            if not last_at_rows:  # every position went through every block: keep those followed by a label
                x = take(x, rows)
            loss = F.cross_entropy(self.lm_head(x[valid]).float(), labels.gather(1, rows + 1)[valid])  # N labels
            return LMOutput(logits=None, aux_loss=aux_loss, loss=loss + aux_loss,
                            attentions=tuple(attentions) if output_attentions else None)
        logits = self.lm_head(x[:, -logits_to_keep:])  # (B, T or logits_to_keep, vocab)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits for every position (logits_to_keep=0)")
            loss = causal_lm_loss(logits, labels) + aux_loss
        return LMOutput(logits=logits, past_key_values=cache if use_cache else None, aux_loss=aux_loss,
                        loss=loss, attentions=tuple(attentions) if output_attentions else None)
