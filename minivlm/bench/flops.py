"""What the model costs, counted from the config: the FLOPs of a training step (and the MFU they
give against a peak rate), and the bytes of the KV cache when generating.

A matmul of an (n, k) input with a (k, m) weight is 2·n·k·m FLOPs (one multiply + one add each).
So a token going through the weights of a model costs 2·N FLOPs, N = the weights it multiplies
with ("matmul parameters": biases, norms, embedding look-ups are ignored, they are O(N/width)).
Backward costs twice the forward: one matmul for the gradient of the input, one for the weight.
Attention scores add the part that grows with the sequence: q·k^T and weights·v are each
2·T·T·d per layer (d = heads × head_dim = hidden size), counted over the full T×T square as in
PaLM's MFU definition. A causal kernel may skip the masked half: the count is a property of the
model, not of the kernel, so MFU stays comparable between implementations.

Nothing here builds a model: tests/test_bench.py checks the counts against the modules' real weights.
"""

from __future__ import annotations

from ..model.config import LMConfig, VisionConfig, VLMConfig

# Peak dense throughput of an H100 SXM (NVIDIA's datasheet, without 2:4 sparsity), in TFLOP/s: the
# default denominator of MFU on a GPU. bf16/fp16 run on the tensor cores; fp32 matmuls run as TF32
# (the benchmark switches it on, as training does).
H100_PEAK_TFLOPS = {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}

# Peak dense rates of the cards `bench gpu` recognises by torch.cuda.get_device_name(), first match
# wins (so the PCIe H100, slower clocks and fewer SMs, comes before the plain "H100" of the SXM card).
# The H200 is the H100 SXM's chip with more and faster memory: same compute. "GH200" matches "H200"
# and has that chip too. The H100 NVL is left unknown on purpose: NVIDIA's datasheets give two
# different numbers for it, and a guessed denominator would make an MFU look precise that is not.
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 378.0}),
    ("H100 NVL", None),
    ("H100", H100_PEAK_TFLOPS),
    ("H200", H100_PEAK_TFLOPS),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
]


def card_peak_tflops(device_name: str, dtype: str) -> float | None:
    """Peak dense TFLOP/s of the card called `device_name` in `dtype` (fp32 = TF32), or None if unknown."""
    for key, rates in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return rates[dtype] if rates else None
    return None


def lm_matmul_params(c: LMConfig) -> int:
    """Decoder weights one token is multiplied with: attention + feed-forward per layer + lm_head.
    With MoE, only the experts a token is routed to (top-k routed + shared) and the router count."""
    d = c.hidden_size
    attn = 2 * d * c.num_attention_heads * c.head_dim + 2 * d * c.num_key_value_heads * c.head_dim  # q,o + k,v
    ffn = 3 * d * c.intermediate_size  # SwiGLU: gate, up, down
    if c.use_moe:
        ffn = ffn * (c.num_experts_per_tok + c.n_shared_experts) + d * c.n_routed_experts
    return c.num_hidden_layers * (attn + ffn) + c.vocab_size * d  # the tied lm_head is a real matmul


def vision_layers_run(v: VisionConfig) -> int:
    """select_features stops after the selected layer: later layers cost nothing."""
    return v.select_layer if v.select_layer >= 0 else v.num_hidden_layers + 1 + v.select_layer


def vision_forward_flops(v: VisionConfig) -> int:
    """Forward FLOPs of the vision tower for ONE image, up to the selected layer."""
    P, d = v.num_patches, v.hidden_size
    layer = 4 * d * d + 2 * d * v.intermediate_size  # q, k, v, out + fc1, fc2
    n = vision_layers_run(v)
    patch = 2 * P * v.num_channels * v.patch_size ** 2 * d  # the 16x16 stride-16 conv is a matmul per patch
    return patch + n * (2 * layer * (P + 1) + 4 * (P + 1) ** 2 * d)  # P patches + CLS


def projector_matmul_params(cfg: VLMConfig) -> int:
    dv, d = cfg.vision.hidden_size, cfg.lm.hidden_size
    # ln_mlp (minimind-3v) has the matmuls of mlp2x_gelu; its LayerNorm is not a matmul.
    return {"linear": dv * d, "mlp2x_gelu": dv * d + d * d, "ln_mlp": dv * d + d * d,
            "identity": 0}[cfg.projector_type]


def train_step_flops(cfg: VLMConfig, batch: int, seq_len: int, images_per_sample: int = 1,
                     decoder_frozen: bool = False) -> dict:
    """FLOPs of one training step, by part (see the module docstring and docs/benchmarks.md).

    decoder    6·N_lm·T + 12·L·T²·d per sequence (forward 2N + attention 4LT²d, backward twice that).
               decoder_frozen (the pretrain policy: projector only): 4·N_lm·T, the backward still
               computes every input gradient down to the projector but no decoder weight gradient;
               the attention part is unchanged (its matmuls have no weights, only inputs)
    projector  4·N_proj·run_length per image: forward + weight gradient only (the frozen tower
               needs no input gradient)
    vision     forward only, 2·N_vis·197 + 4·L_v·197²·d_v per image (frozen, under no_grad)
    """
    c, T = cfg.lm, seq_len
    images = batch * images_per_sample
    parts = {
        "decoder": batch * ((4 if decoder_frozen else 6) * lm_matmul_params(c) * T
                            + 12 * c.num_hidden_layers * T * T * c.hidden_size),
        "projector": images * 4 * projector_matmul_params(cfg) * cfg.run_length,
        "vision": images * vision_forward_flops(cfg.vision),
    }
    parts["total"] = sum(parts.values())
    return parts


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> tuple[float, float | None]:
    """Achieved TFLOP/s, and that as a fraction of `peak_tflops` (None when no peak is known, e.g. a
    CPU: a fraction of an unknown number would only look precise)."""
    tflops = flops / seconds / 1e12
    return tflops, (tflops / peak_tflops if peak_tflops else None)


def kv_cache_bytes(c: LMConfig, prompt_tokens: int, new_tokens: int, bytes_per_value: int = 2) -> int:
    """Bytes of the keys and values cached while generating `new_tokens` after the prompt.
    lm.KVCache allocates exactly the prompt, then doubles its capacity whenever it is full."""
    capacity = prompt_tokens
    while capacity < prompt_tokens + new_tokens - 1:  # the last new token is never fed back
        capacity *= 2
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * capacity * bytes_per_value  # k and v
