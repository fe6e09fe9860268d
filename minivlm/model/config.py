"""Configuration dataclasses and named presets.

Three small dataclasses describe the whole model:

* ``LMConfig``     – the MiniMind (Llama-style) decoder. ``LMConfig()`` is the 26M "MiniMind2-Small".
* ``VisionConfig`` – the CLIP ViT. ``VisionConfig()`` is ``openai/clip-vit-base-patch16``.
* ``VLMConfig``    – ties them together: which vision features to take, the projector, the placeholder.

Presets are plain functions returning fresh objects, so nobody mutates a shared default by accident.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def ffn_width(hidden_size: int) -> int:
    """MiniMind's SwiGLU width rule: 8/3 of the hidden size, rounded up to a multiple of 64."""
    h = int(hidden_size * 8 / 3)
    return 64 * ((h + 63) // 64)


@dataclass
class LMConfig:
    vocab_size: int = 6400
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int | None = None  # None -> ffn_width(hidden_size)
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768  # length of the RoPE tables
    rms_norm_eps: float = 1e-5
    dropout: float = 0.0
    # Mixture of experts (MiniMind's optional MoE feed-forward).
    use_moe: bool = False
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.1
    # MiniMind reads and writes tokens with one matrix (lm_head.weight is embed_tokens.weight). False
    # gives lm_head its own matrix and unit-scale embeddings (see MiniMindLM.__init__ for why).
    tie_word_embeddings: bool = True
    # "sdpa" uses F.scaled_dot_product_attention; "eager" computes softmax(QK^T)V by hand and can
    # return the attention weights (used by the notebooks' heat maps and as a benchmark baseline).
    attn_impl: str = "sdpa"

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = ffn_width(self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'eager', got {self.attn_impl!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 512  # width of CLIP's joint embedding space (visual_projection)
    # Which features the VLM takes: the output of layer `select_layer` (an index into the
    # num_hidden_layers + 1 hidden states; -1 = last layer as MiniMind-V, -2 as LLaVA), and
    # "patch" (drop CLS) or "cls_patch" (keep it).
    select_layer: int = -1
    select_feature: str = "patch"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {self.select_feature!r}")
        if not -(self.num_hidden_layers + 1) <= self.select_layer <= self.num_hidden_layers:
            raise ValueError(f"select_layer {self.select_layer} is out of range for "
                             f"{self.num_hidden_layers} layers")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # 196 for ViT-B/16 at 224 px


@dataclass
class VLMConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector_type: str = "linear"  # "linear" (MiniMind-V) | "mlp2x_gelu" | "identity" (LLaVA)
    # The token id of '@', the placeholder that stands for one image feature (34 in MiniMind's
    # vocabulary; a tokenizer trained here may give it another id, which the checkpoint records).
    placeholder_id: int = 34

    def __post_init__(self):
        # Accept nested dicts (as read back from JSON).
        if isinstance(self.lm, dict):
            self.lm = LMConfig(**self.lm)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if self.projector_type not in ("linear", "mlp2x_gelu", "identity"):
            raise ValueError(f"unknown projector_type {self.projector_type!r}")

    @property
    def run_length(self) -> int:
        """How many placeholder tokens stand for one image (= features the vision tower yields)."""
        extra = 1 if self.vision.select_feature == "cls_patch" else 0
        return self.vision.num_patches + extra

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        d = {k: v for k, v in d.items() if k != "image_token"}  # a field of early checkpoints, always "@"
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Presets

def lm_26m() -> LMConfig:
    return LMConfig()


def lm_104m() -> LMConfig:
    return LMConfig(hidden_size=768, num_hidden_layers=16)


def lm_26m_moe() -> LMConfig:
    return LMConfig(use_moe=True)


def lm_tiny() -> LMConfig:
    """A CPU-sized decoder with the real architecture, for tests and the offline demo."""
    return LMConfig(vocab_size=6400, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=2048)


def vision_tiny() -> VisionConfig:
    """A small CLIP-style ViT on 96-px images: 6x6 = 36 patches of 16 px."""
    return VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        image_size=96, patch_size=16, projection_dim=128)


LM_PRESETS = {"26m": lm_26m, "104m": lm_104m, "26m-moe": lm_26m_moe, "tiny": lm_tiny}


def vlm_preset(name: str) -> VLMConfig:
    """Named VLM configurations: '26m', '104m', '26m-moe' (all with CLIP ViT-B/16) and 'tiny'."""
    if name not in LM_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(LM_PRESETS)}")
    vision = vision_tiny() if name == "tiny" else VisionConfig()
    return VLMConfig(lm=LM_PRESETS[name](), vision=vision)
