"""Loading and saving VLM / LM checkpoints in MiniMind-V's layouts.

A checkpoint is a plain state dict (`.pth`, or `.safetensors`) without CLIP weights: CLIP is loaded
separately from its Hugging Face folder. minivlm writes a `<name>.json` beside each checkpoint with
the config, so loading needs no guessing; for files without one the config is read off tensor shapes.

Two key layouts exist in the wild:
  2025-04 (minivlm's own names, = Llama's): model.embed_tokens.weight, model.layers.{i}.self_attn.q_proj...
  2025-02: tok_embeddings.weight, layers.{i}.attention.wq..., with *interleaved* RoPE; converting it
           needs a row permutation of wq/wk, see `convert_2025_02`.
Nothing is matched loosely: missing, unexpected or mis-shaped keys are an error that names them.

The JSON is written last and vouches for the files of one save: the step and the sha256 of the `.pth`
and of the trained vision tower's `model.safetensors`. A run killed between writing them leaves files
of two saves; `load_vlm` then refuses, naming the file that does not belong. It also refuses weights
holding NaN or infinity (they would answer with an empty string, silently).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings

import torch

from .config import LMConfig, VisionConfig, VLMConfig
from .vision import CLIPVisionModel
from .vlm import MiniMindVLM
from ..common import atomic_write
from .lm import rope_tables
from ..data.tokenizer import Tokenizer
from .weights import WeightsError, check_state_dict, load_state_dict, read_json

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


def infer_lm_config(sd: dict, **overrides) -> LMConfig:
    """Read an LMConfig off the tensor shapes of a 2025-04 state dict (heads default to MiniMind's 8)."""
    vocab, hidden = sd["model.embed_tokens.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    experts = {int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.0\.mlp\.experts\.(\d+)\.", k))}
    shared = {int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", k))}
    ffn_key = "model.layers.0.mlp.experts.0.gate_proj.weight" if experts else "model.layers.0.mlp.gate_proj.weight"
    fields = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                  intermediate_size=sd[ffn_key].shape[0], use_moe=bool(experts))
    if experts:
        fields.update(n_routed_experts=len(experts), n_shared_experts=len(shared))
    fields.update(overrides)
    heads = fields.get("num_attention_heads", 8)
    fields.setdefault("num_key_value_heads", sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // (hidden // heads))
    return LMConfig(**fields)


def config_path_for(weights) -> str:
    return os.path.splitext(os.fspath(weights))[0] + ".json"


def read_meta(weights) -> dict:
    """The JSON minivlm writes beside a checkpoint ({} for files without one)."""
    path = config_path_for(weights)
    return read_json(path) if os.path.isfile(path) else {}


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_files(weights, saved: dict, check_vision: bool):
    """The weights (and, when it is used, the saved vision tower) are the files the JSON was written
    with: same sha256. A JSON without "sha256" (older minivlm) vouches for nothing and is not checked."""
    digests = saved.get("sha256", {})
    paths = {"weights": weights}
    if check_vision and "vision_folder" in saved:
        paths["vision"] = os.path.join(os.path.dirname(os.path.abspath(weights)), saved["vision_folder"],
                                       "model.safetensors")
    for part, path in paths.items():
        if part in digests and os.path.isfile(path) and sha256_of(path) != digests[part]:
            raise WeightsError(f"{path}: not the file saved with {config_path_for(weights)} (step "
                               f"{saved.get('step', '?')}): a save was interrupted between its files, or one "
                               f"was replaced; use the files of one save (or --resume the run to save again)")


def check_finite(model, source):
    """Refuse weights with NaN or infinity, naming the first such tensor."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise WeightsError(f"{source}: tensor {name} holds NaN or infinite values (a diverged or damaged "
                               f"checkpoint)")


def load_vlm(weights, vision=None, dtype: torch.dtype | None = None, **config_overrides) -> MiniMindVLM:
    """Build a MiniMindVLM from a checkpoint (2025-04 or 2025-02 layout, fp16/fp32) and a CLIP tower.

    weights: path to the `.pth`/`.safetensors` file. vision: a Hugging Face CLIP folder, a
    CLIPVisionModel, or None (then the tower saved with the checkpoint, as recorded in its JSON, else a
    randomly initialised tower, with a warning). dtype: of the weights (default float32); they are
    converted as they are read, so a bf16 model never exists in fp32. config_overrides: LMConfig fields
    (e.g. num_attention_heads=8) that cannot be read off the tensor shapes.
    """
    weights, dtype = os.fspath(weights), dtype or torch.float32
    saved = read_meta(weights) or None
    heads = config_overrides.get("num_attention_heads",
                                 saved["vlm"]["lm"]["num_attention_heads"] if saved else 8)
    sd = to_2025_04(load_state_dict(weights), heads)
    if saved:
        tied = saved["vlm"]["lm"].get("tie_word_embeddings", True)
        check_tying(sd, tied, weights)
    else:
        tied = file_is_tied(sd)  # no config to say: the file decides
    if tied:
        del sd["lm_head.weight"]  # the embeddings: re-tied below instead of converted twice
    for k in list(sd):  # before the tower is read: the file's copy of each tensor goes once converted
        sd[k] = sd.pop(k).to(dtype)
    vision_model = _vision_for(weights, vision, saved, dtype)
    if saved:
        cfg = VLMConfig.from_dict(saved["vlm"])
        for k, v in config_overrides.items():
            setattr(cfg.lm, k, v)
        cfg.lm.__post_init__()
        if "placeholder_id" in saved:  # written beside the config by every minivlm version
            cfg.placeholder_id = saved["placeholder_id"]
    else:
        proj_keys = [k for k in sd if k.startswith("vision_proj.")]
        kind = ("mlp2x_gelu" if "vision_proj.vision_proj.2.weight" in sd else
                "linear" if "vision_proj.vision_proj.0.weight" in sd else "identity")
        if not proj_keys and kind == "identity" and vision_model.config.hidden_size != sd["model.embed_tokens.weight"].shape[1]:
            raise WeightsError(f"{weights}: no projector weights (vision_proj.*) in the checkpoint")
        cfg = VLMConfig(lm=infer_lm_config(sd, tie_word_embeddings=tied, **config_overrides),
                        vision=vision_model.config, projector_type=kind)
    cfg.vision = vision_model.config
    # Decoder and projector on the meta device: shapes only, no random init that the checkpoint would
    # overwrite; the checkpoint's tensors (converted one by one) then become the parameters.
    with torch.device("meta"):
        model = MiniMindVLM(cfg, vision_model=vision_model)
    check_state_dict(model.lm_state_dict(), {"lm_head.weight": sd["model.embed_tokens.weight"], **sd}, weights)
    model.load_state_dict(sd, strict=False, assign=True)  # vision keys: loaded with the tower
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # The RoPE tables are derived buffers (not in checkpoints): computed for real now.
    model.model.freqs_cos, model.model.freqs_sin = rope_tables(cfg.lm.head_dim, cfg.lm.max_position_embeddings,
                                                               cfg.lm.rope_theta)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"not loaded: {left}"  # a bug, not a user error: check_state_dict saw every key
    if saved:
        check_files(weights, saved, check_vision=vision is None)
    check_finite(model, weights)
    return model


def _vision_for(weights, vision, saved, dtype) -> CLIPVisionModel:
    """The tower load_vlm uses: given, from a folder, the one saved with the checkpoint, or random."""
    if isinstance(vision, CLIPVisionModel):
        return vision.to(dtype)  # in place (a no-op when it already is): one dtype for the whole model
    if vision is not None:
        return CLIPVisionModel.from_pretrained(vision, dtype=dtype)
    if saved and "vision_folder" in saved:  # a tower trained together with this checkpoint
        return CLIPVisionModel.from_pretrained(
            os.path.join(os.path.dirname(os.path.abspath(weights)), saved["vision_folder"]), dtype=dtype)
    vision_cfg = VisionConfig(**saved["vlm"]["vision"]) if saved else VisionConfig()
    warnings.warn(f"{weights}: no CLIP vision tower given (vision=...): it is randomly initialised, "
                  f"image features will be meaningless")
    return CLIPVisionModel(vision_cfg).to(dtype)


def load_lm_weights(model, path):
    """Initialise the decoder of `model` (MiniMindLM or MiniMindVLM) from a MiniMind LM checkpoint.
    Every decoder key must be present; projector/vision keys are not expected in an LM file."""
    sd = to_2025_04(load_state_dict(path), model.config.num_attention_heads)
    check_tying(sd, model.config.tie_word_embeddings, os.fspath(path))
    expected = {k: v for k, v in model.state_dict().items()
                if not k.startswith(("vision_encoder.", "vision_proj."))}
    check_state_dict(expected, sd, os.fspath(path))
    model.load_state_dict(sd, strict=False)


def save_vlm(model: MiniMindVLM, path, dtype=torch.float16, vision_folder=None, question_first=False, step=None,
             tokenizer_vocab_size=None):
    """Write the checkpoint (MiniMind-V 2025-04 layout, no CLIP keys), then `<name>.json` beside it.
    vision_folder: where a trained vision tower was saved (recorded so load_vlm finds it).
    question_first: the model was trained with questions before the images (eval_vlm.py's default).
    step, tokenizer_vocab_size: recorded, with the sha256 of each file, for load_vlm's checks."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype) for k, v in model.lm_state_dict().items()}
    atomic_write(path, lambda f: torch.save(sd, f))
    meta = {"format": "minivlm-checkpoint-1", "vlm": model.vlm_config.to_dict(),
            "placeholder_id": model.placeholder_id, "question_first": question_first,
            "sha256": {"weights": sha256_of(path)}}
    if step is not None:
        meta["step"] = step
    if tokenizer_vocab_size is not None:
        meta["tokenizer_vocab_size"] = tokenizer_vocab_size
    if vision_folder is not None:
        meta["vision_folder"] = os.path.relpath(vision_folder, os.path.dirname(os.path.abspath(path)))
        meta["sha256"]["vision"] = sha256_of(os.path.join(vision_folder, "model.safetensors"))
    atomic_write(config_path_for(path), json.dumps(meta, indent=2).encode())  # last: it vouches for the rest


def tokenizer_beside(weights) -> str:
    """Where a checkpoint's tokenizer lives: the tokenizer.json that training copied beside the weights."""
    return os.path.join(os.path.dirname(os.path.abspath(weights)), "tokenizer.json")


def load_with_tokenizer(weights, tokenizer=None, vision=None, dtype: torch.dtype | None = None, **config_overrides):
    """What answering questions needs, for eval_vlm.py, the web page and the probes: the model (load_vlm),
    its tokenizer (tokenizer.json beside the weights unless given), checked to belong together, and whether
    it was trained with the question before the images. -> (model, tokenizer, question_first)"""
    weights = os.fspath(weights)
    if not os.path.isfile(weights):
        raise WeightsError(f"{weights}: weights file not found")
    tok_path = tokenizer or tokenizer_beside(weights)
    if not os.path.exists(tok_path):
        raise WeightsError(f"{tok_path}: tokenizer not found (pass --tokenizer)")
    try:
        tok = Tokenizer.from_file(tok_path)
    except (ValueError, OSError) as e:  # not a tokenizer.json, or one without ChatML's special tokens
        raise WeightsError(str(e)) from None
    model = load_vlm(weights, vision=vision, dtype=dtype, **config_overrides)
    meta = read_meta(weights)
    check_tokenizer(model, tok, tok_path, meta.get("tokenizer_vocab_size"))
    return model, tok, bool(meta.get("question_first", False))


def check_tokenizer(model: MiniMindVLM, tokenizer, source: str, trained_with: int | None = None):
    """Refuse a tokenizer that does not belong to the model: ids past the embedding table, fewer tokens
    than the model was trained with (`trained_with`, from the checkpoint JSON; a foreign tokenizer that
    happens to fit would make the model read nonsense), or a different id for '@' (every image run
    would then go unnoticed). `source` names the tokenizer."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise WeightsError(f"{source}: tokenizer has {tokenizer.vocab_size} tokens, the model only "
                           f"{model.config.vocab_size}: they do not belong together")
    if trained_with is not None and tokenizer.vocab_size != trained_with:
        raise WeightsError(f"{source}: tokenizer has {tokenizer.vocab_size} tokens, but the checkpoint was "
                           f"trained with one of {trained_with}: they do not belong together")
    if tokenizer.placeholder_id != model.placeholder_id:
        raise WeightsError(f"{source}: '@' is id {tokenizer.placeholder_id} here but {model.placeholder_id} "
                           f"in the checkpoint: they do not belong together")
