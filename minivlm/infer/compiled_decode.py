"""One decoding step of batch 1 as a single compiled graph: `generate(..., compiled=True)`.

A batch-1 step reads every decoder weight once and does little else, so its floor is the time it takes
to stream the weights from memory. The eager step is far from it on a CPU (docs/benchmarks.md): the
batch-1 matrix-vector products of torch's BLAS read the weights at about half the memory's rate, and
some thirty small ops per layer each pay their own dispatch. Here the step is written out once more with
static shapes, for torch.compile (inductor) to turn into a few fused loops:

  * every Linear is `(W * x).sum(-1)`: a product inductor fuses into one pass over W;
  * the KV cache is a fixed buffer per layer, written in place at `position`, and attention reads all of
    it under a mask (the shapes never change, so the graph compiles once per cache capacity);
  * RMSNorm, RoPE, softmax, SiLU and the residual adds fuse into the loops around them.

The decoder's weights are moved into one block of 2 MB pages first (hugepages.py; same values, same
Parameter objects), which lets one core stream them faster.

The prefill (prompt + images) stays eager: it runs once per answer and is a large matrix product. Its
KV cache is copied into the fixed buffers, and every further token goes through the compiled step. The
maths is the decoder's (model/lm.py); only the order of float additions differs, so the greedy tokens
match the eager ones (a test and `python -m minivlm.bench decode` check that). Dense decoders only:
an MoE step picks its experts from the data, which a static graph cannot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model.lm import KVCache, MiniMindLM, apply_rope
from .hugepages import pack_in_huge_pages


# Two inductor settings, each measured faster on the 2-core AMD EPYC of docs/benchmarks.md (~5-10 %):
#   cpp.simdlen 256: AVX2-wide loops; this Zen 4 core splits an AVX-512 op in two halves anyway, and the
#     narrower loop read the weights faster;
#   realize_reads_threshold 1: a normalised input read by several Linears (q, k, v; gate, up) is written
#     to a buffer once, instead of being recomputed inside every row of every weight it meets.
INDUCTOR_OPTIONS = {"cpp.simdlen": 256, "realize_reads_threshold": 1}


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (in,), w (out, in) -> (out,), accumulated in fp32 whatever the weights' dtype."""
    return (w.float() * x.float()).sum(-1).to(x.dtype)


def supported(model, batch: int, attention_mask) -> bool:
    """Whether generate can decode this call through the compiled step."""
    cfg = getattr(model, "config", None)
    return (isinstance(model, MiniMindLM) and batch == 1 and not cfg.use_moe
            and (attention_mask is None or bool(attention_mask.all())))


class CompiledDecoder:
    """The compiled batch-1 step of one model, with its fixed KV buffers (capacity positions).

    start(cache, length): copy a prefill's KVCache in. step(token, position) -> logits (1, vocab)."""

    def __init__(self, model: MiniMindLM, capacity: int):
        cfg = model.config
        self.model, self.capacity = model, capacity
        # The step streams these weights once per token: one block of 2 MB pages reads faster (hugepages.py).
        pack_in_huge_pages([*model.model.parameters(), model.lm_head.weight])
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        p = model.lm_head.weight
        shape = (self.n_kv, capacity, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in model.model.layers]
        self.values = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in model.model.layers]
        self.compiled = torch.compile(self.forward, dynamic=False, fullgraph=True, options=INDUCTOR_OPTIONS)

    def start(self, cache: KVCache, length: int):
        for layer in range(len(self.keys)):
            self.keys[layer][:, :length] = cache.keys[layer][0, :, :length]  # (KV, length, hd)
            self.values[layer][:, :length] = cache.values[layer][0, :, :length]

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        pos = torch.tensor([position], device=token.device)
        return self.compiled(token.view(1), pos, self.keys, self.values)[None]  # (1, vocab)

    def forward(self, token, pos, keys, values):
        """token (1,), pos (1,): the new token and its position -> logits (vocab,). Writes keys/values."""
        m, H, KV, hd = self.model.model, self.n_heads, self.n_kv, self.head_dim
        x = m.embed_tokens.weight.index_select(0, token)[0]  # (h,)
        cos = m.freqs_cos.index_select(0, pos)[0].to(x.dtype)  # (hd,)
        sin = m.freqs_sin.index_select(0, pos)[0].to(x.dtype)
        seen = torch.arange(self.capacity, device=x.device) <= pos  # (capacity,): the cached positions + this one
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = linear(h, a.q_proj.weight).view(H, hd)
            k = linear(h, a.k_proj.weight).view(KV, hd)
            v = linear(h, a.v_proj.weight).view(KV, hd)
            if a.qk_norm:
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # one position: cos, sin (hd,)
            keys[i].index_copy_(1, pos, k[:, None])  # (KV, capacity, hd), written in place
            values[i].index_copy_(1, pos, v[:, None])
            # grouped-query: the H // KV query heads of a key/value head read it together. Written as
            # products and sums (not matmuls), so that inductor fuses them instead of calling a kernel.
            qg = q.view(KV, H // KV, 1, hd)
            scores = (qg * keys[i][:, None]).sum(-1) / math.sqrt(hd)  # (KV, H/KV, capacity)
            weights = scores.float().masked_fill(~seen, float("-inf")).softmax(-1).to(x.dtype)
            y = (weights[..., None] * values[i][:, None]).sum(-2).reshape(H * hd)  # (H * hd,)
            x = x + linear(y, a.o_proj.weight)
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            x = x + linear(F.silu(linear(h, mlp.gate_proj.weight)) * linear(h, mlp.up_proj.weight),
                           mlp.down_proj.weight)
        return linear(m.norm(x), self.model.lm_head.weight)  # (vocab,)


class CompiledSteps(dict):
    """The compiled steps of one model, kept on it. A copy or a pickle of the model starts with none
    (they are rebuilt on use): a copied step would still read the original model's weights."""

    def __reduce__(self):
        return CompiledSteps, ()

    def __deepcopy__(self, memo):
        return CompiledSteps()


def decoder_for(model: MiniMindLM, needed: int) -> CompiledDecoder:
    """The model's compiled step with room for `needed` positions, made on first use and kept on the
    model. Capacities are powers of two from 256 up, so a new prompt length rarely means a new compile."""
    capacity = max(256, 1 << (needed - 1).bit_length())
    capacity = min(capacity, max(needed, model.config.max_position_embeddings))
    w = model.lm_head.weight
    key = (capacity, w.dtype, w.device)  # a model cast or moved later gets buffers of its own
    decoders = model.__dict__.setdefault("_compiled_decoders", CompiledSteps())  # not a submodule: never saved
    if key not in decoders:
        decoders[key] = CompiledDecoder(model, capacity)
    return decoders[key]
