"""Configuration dataclasses and named presets.

Three small dataclasses describe the whole model:

* ``LMConfig``     – the MiniMind (Llama-style) decoder. ``LMConfig()`` is the 26M "MiniMind2-Small".
* ``VisionConfig`` – the CLIP ViT. ``VisionConfig()`` is ``openai/clip-vit-base-patch16``.
* ``SiglipVisionConfig`` – the SigLIP tower of the minimind-3v generation.
* ``VLMConfig``    – ties them together: which vision features to take, the projector, the placeholder.

Presets are plain functions returning fresh objects, so nobody mutates a shared default by accident.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..common import is_int
from ..data.processing import ImageTransform
from ..data.prompt import TEMPLATES  # the chat templates data/prompt.py renders


class ConfigError(ValueError):
    """A config field with an unusable value. `field` names it, dotted inside a VLMConfig (lm.hidden_size)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name} {message}")
        self.field, self.message = field_name, message


# Upper bounds far above any real model (Llama-3's vocabulary is 128K, its context 128K tokens) and far
# below what a damaged file could ask for: max_position_embeddings 1e12 would allocate terabytes of RoPE
# table before a weight is compared with the model.
MAX_WIDTH, MAX_LAYERS, MAX_VOCAB, MAX_POSITIONS, MAX_IMAGE_SIZE = 2**16, 1024, 2**21, 2**20, 4096


def _int_field(cfg, name: str, lo: int, hi: int, prefix: str = ""):
    value = getattr(cfg, name)
    if not is_int(value) or not lo <= value <= hi:
        raise ConfigError(prefix + name, f"must be an integer in [{lo}, {hi}], got {value!r}")


def _float_field(cfg, name: str, lo: float, hi: float, open_hi: bool = False):
    value = getattr(cfg, name)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and lo <= value and (value < hi if open_hi else value <= hi))
    if not ok:
        raise ConfigError(name, f"must be a number in [{lo}, {hi}{')' if open_hi else ']'}, got {value!r}")


def _choice_field(cfg, name: str, choices):
    value = getattr(cfg, name)
    if not isinstance(value, (str, bool)) or value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_vit_fields(cfg):
    """The fields every ViT config shares (CLIP's VisionConfig, siglip.SiglipVisionConfig): sizes in range,
    heads dividing the width, patches tiling the image."""
    for name, hi in (("hidden_size", MAX_WIDTH), ("intermediate_size", 16 * MAX_WIDTH),
                     ("num_hidden_layers", MAX_LAYERS), ("num_attention_heads", MAX_WIDTH),
                     ("image_size", MAX_IMAGE_SIZE), ("patch_size", MAX_IMAGE_SIZE), ("num_channels", 64)):
        _int_field(cfg, name, 1, hi)
    _float_field(cfg, "layer_norm_eps", 0, 1, open_hi=True)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError("hidden_size", f"{cfg.hidden_size} is not divisible by "
                                         f"num_attention_heads {cfg.num_attention_heads}")
    if cfg.image_size % cfg.patch_size:
        raise ConfigError("image_size", f"{cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")


def config_from_file(cls, fields, path):
    """`cls(**fields)` for a config read from the file `path`: a missing, unknown or unusable field is a
    one-line WeightsError naming the file and the field (never a ZeroDivisionError from a head count 0,
    nor a RoPE table sized by a damaged number)."""
    from .weights import WeightsError  # the error the loaders' callers already report in one line
    if not isinstance(fields, dict):
        raise WeightsError(f"{path}: expected a JSON object of {cls.__name__} fields, got {type(fields).__name__}")
    try:
        return cls.from_dict(fields) if hasattr(cls, "from_dict") else cls(**fields)
    except ConfigError as e:
        raise WeightsError(f"{path}: field {e}") from None
    except TypeError as e:  # an unknown or missing field name
        raise WeightsError(f"{path}: {cls.__name__} {str(e).split('() ', 1)[-1]}") from None


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
    # "minimind-v": DeepSeek-style, as MiniMind 2025 (top-k weights renormalised only when k > 1, the
    # auxiliary loss per sequence). "minimind-3v": top-k weights always renormalised (top-1 -> weight 1),
    # the auxiliary loss over the whole batch (Switch Transformer's f_i * P_i).
    moe_style: str = "minimind-v"
    # MiniMind reads and writes tokens with one matrix (lm_head.weight is embed_tokens.weight). False
    # gives lm_head its own matrix and unit-scale embeddings (see MiniMindLM.__init__ for why).
    tie_word_embeddings: bool = True
    # "sdpa" uses F.scaled_dot_product_attention; "eager" computes softmax(QK^T)V by hand and can
    # return the attention weights (used by the notebooks' heat maps and as a benchmark baseline).
    attn_impl: str = "sdpa"
    # Qwen3-style QK-norm (minimind-3v): RMSNorm over each head's query and key vector, after the head
    # reshape and before RoPE, weights `self_attn.{q,k}_norm.weight` (head_dim), eps rms_norm_eps.
    qk_norm: bool = False

    def __post_init__(self):
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            self.intermediate_size = ffn_width(self.hidden_size)
        for name, hi in (("vocab_size", MAX_VOCAB), ("hidden_size", MAX_WIDTH), ("num_hidden_layers", MAX_LAYERS),
                         ("num_attention_heads", MAX_WIDTH), ("num_key_value_heads", MAX_WIDTH),
                         ("intermediate_size", 16 * MAX_WIDTH), ("max_position_embeddings", MAX_POSITIONS),
                         ("n_routed_experts", 1024), ("num_experts_per_tok", 1024)):
            _int_field(self, name, 1, hi)
        _int_field(self, "n_shared_experts", 0, 1024)
        _float_field(self, "rope_theta", 1e-6, 1e12)
        _float_field(self, "rms_norm_eps", 0, 1, open_hi=True)
        _float_field(self, "dropout", 0, 1, open_hi=True)
        _float_field(self, "aux_loss_alpha", 0, 1e6)
        for name in ("use_moe", "norm_topk_prob", "tie_word_embeddings", "qk_norm"):
            _choice_field(self, name, (True, False))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size", f"{self.hidden_size} is not divisible by "
                                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads", f"{self.num_attention_heads} is not a multiple of "
                                                     f"num_key_value_heads {self.num_key_value_heads}")
        _choice_field(self, "moe_style", ("minimind-v", "minimind-3v"))
        if self.attn_impl not in ("sdpa", "eager"):
            raise ConfigError("attn_impl", f"must be 'sdpa' or 'eager', got {self.attn_impl!r}")
        if self.use_moe and self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError("num_experts_per_tok", f"{self.num_experts_per_tok} is more than n_routed_experts "
                                                     f"{self.n_routed_experts}")

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
        check_vit_fields(self)
        _int_field(self, "projection_dim", 1, MAX_WIDTH)
        _choice_field(self, "hidden_act", ("quick_gelu", "gelu"))  # what vision.CLIPMLP implements
        _choice_field(self, "select_feature", ("patch", "cls_patch"))
        _int_field(self, "select_layer", -(self.num_hidden_layers + 1), self.num_hidden_layers)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # 196 for ViT-B/16 at 224 px


@dataclass
class SiglipVisionConfig:
    """SigLIP's tower (siglip.py). Defaults: SigLIP2 base, patch 32 at 256 px (64 patches of width 768),
    the tower of minimind-3v. `resample` is not a Hugging Face config field: it is the PIL filter of the
    folder's preprocessor_config.json (2 = bilinear, what SigLIP2 folders set), kept with the model."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 256
    patch_size: int = 32
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    resample: int = 2

    def __post_init__(self):
        check_vit_fields(self)
        _choice_field(self, "hidden_act", ("gelu_pytorch_tanh",))  # what siglip.SiglipMLP implements
        _int_field(self, "resample", 0, 5)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # 64 for patch 32 at 256 px


VISION_CONFIGS = {"clip": VisionConfig, "siglip": SiglipVisionConfig}


@dataclass
class VLMConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig | SiglipVisionConfig = field(default_factory=VisionConfig)
    projector_type: str = "linear"  # "linear" (MiniMind-V) | "mlp2x_gelu" | "identity" (LLaVA) | "ln_mlp" (minimind-3v)
    # The token id of the placeholder that stands for one image feature: '@' (34 in MiniMind's vocabulary;
    # a tokenizer trained here may give it another id, which the checkpoint records), or minimind-3v's
    # special token <|image_pad|> (12).
    placeholder_id: int = 34
    vision_type: str = "clip"  # "clip" (VisionConfig, vision.py) | "siglip" (SiglipVisionConfig, siglip.py)
    chat_template: str = "minimind-v"  # how prompts are rendered (data/prompt.py): MiniMind-V's or minimind-3v's

    def __post_init__(self):
        _choice_field(self, "vision_type", tuple(VISION_CONFIGS))
        _choice_field(self, "chat_template", TEMPLATES)
        # Accept nested dicts (as read back from JSON); an error inside names the field as lm.<field>.
        for part, kind in (("lm", LMConfig), ("vision", VISION_CONFIGS[self.vision_type])):
            value = getattr(self, part)
            if isinstance(value, kind):
                continue
            if not isinstance(value, dict):
                raise ConfigError(part, f"must be an object of {kind.__name__} fields, got {type(value).__name__}")
            try:
                setattr(self, part, kind(**value))
            except ConfigError as e:
                raise ConfigError(f"{part}.{e.field}", e.message) from None
            except TypeError as e:
                raise ConfigError(part, str(e).split("() ", 1)[-1]) from None
        _choice_field(self, "projector_type", ("linear", "mlp2x_gelu", "identity", "ln_mlp"))
        # The placeholder is looked up in the embedding table like any token before its rows are replaced.
        _int_field(self, "placeholder_id", 0, self.lm.vocab_size - 1)

    @property
    def run_length(self) -> int:
        """How many placeholder tokens stand for one image (= features the vision tower yields)."""
        extra = 1 if getattr(self.vision, "select_feature", "patch") == "cls_patch" else 0  # SigLIP has no CLS
        return self.vision.num_patches + extra

    @property
    def image_transform(self) -> ImageTransform:
        """How this model's images become pixel_values: CLIP's crop, or SigLIP's squash to a square."""
        if self.vision_type == "siglip":
            return ImageTransform(self.vision.image_size, crop=False, resample=self.vision.resample)
        return ImageTransform(self.vision.image_size)

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


def lm_3v() -> LMConfig:
    """minimind-3v's decoder: width 768, 8 layers, 8 query / 4 key-value heads of 96, FFN ceil(768 pi / 64) * 64
    = 2432, RMSNorm eps 1e-6, QK-norm, tied embeddings."""
    return LMConfig(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                    intermediate_size=math.ceil(768 * math.pi / 64) * 64, rms_norm_eps=1e-6, qk_norm=True)


def lm_3v_moe() -> LMConfig:
    """minimind-3v's MoE: 4 routed experts of the full FFN width, top-1, no shared expert, aux loss 5e-4."""
    return dataclasses.replace(lm_3v(), use_moe=True, n_routed_experts=4, num_experts_per_tok=1,
                               n_shared_experts=0, aux_loss_alpha=5e-4, moe_style="minimind-3v")


LM_PRESETS = {"26m": lm_26m, "104m": lm_104m, "26m-moe": lm_26m_moe, "tiny": lm_tiny, "3v": lm_3v,
              "3v-moe": lm_3v_moe}
GENERATION_3V = dict(vision_type="siglip", projector_type="ln_mlp", placeholder_id=12, chat_template="minimind-3v")


def vlm_preset(name: str) -> VLMConfig:
    """Named VLM configurations: '26m', '104m', '26m-moe' (MiniMind-V: CLIP ViT-B/16, 196 '@'), 'tiny' (the
    offline shapes model), '3v' and '3v-moe' (minimind-3v: SigLIP2 p32-256, 64 <|image_pad|>)."""
    if name not in LM_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(LM_PRESETS)}")
    if name.startswith("3v"):
        return VLMConfig(lm=LM_PRESETS[name](), vision=SiglipVisionConfig(), **GENERATION_3V)
    vision = vision_tiny() if name == "tiny" else VisionConfig()
    return VLMConfig(lm=LM_PRESETS[name](), vision=vision)
