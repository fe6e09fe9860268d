"""Loading and saving VLM / LM checkpoints in MiniMind-V's layouts.

A checkpoint is a plain state dict (`.pth`, or `.safetensors`) without CLIP weights: CLIP is loaded
separately from its Hugging Face folder. minivlm writes a `<name>.json` beside each checkpoint with
the config, so loading needs no guessing; for files without one the config is read off tensor shapes.

Both key layouts in the wild (2025-04, 2025-02) and both generations (MiniMind-V, minimind-3v) load:
`layouts.py` recognises and converts them.
Nothing is matched loosely: missing, unexpected or mis-shaped keys are an error that names them.

A save is one unit (`save_vlm`). The JSON vouches for the files of one save: the step and the sha256 of
the `.pth` and of the trained vision tower's `model.safetensors`. The new files are first written in full
into a staging folder `<name>.saving/`; then ONE rename of the JSON switches to them (it names the staging
folder as "staged"); then they are hard-linked to their usual names (`<name>.pth`, `<stage>_vision/`),
the JSON is rewritten without "staged" and the staging folder removed. Whatever instant a run is killed
at, the JSON on disk and the files it vouches for are one consistent save: `load_vlm` follows the JSON,
taking each file where its sha256 matches (usual name first, else staged), and the next save finishes
an interrupted switch first. Files that match nowhere (put together by hand from two saves) are refused,
naming the file that does not belong. It also refuses weights holding NaN or infinity (they would answer
with an empty string, silently).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings

import torch

from .config import GENERATION_3V, VISION_CONFIGS, VLMConfig, config_from_file
from .layouts import check_tying, file_is_tied, infer_lm_config, is_3v, to_2025_04
from .siglip import SiglipVisionModel
from .vision import CLIPVisionModel
from .vlm import MiniMindVLM, build_vision_tower
from ..common import atomic_link, atomic_write
from ..data.tokenizer import Tokenizer
from .weights import WeightsError, shapes_only, check_state_dict, load_state_dict, read_json

def config_path_for(weights) -> str:
    return os.path.splitext(os.fspath(weights))[0] + ".json"


def read_meta(weights) -> dict:
    """The JSON minivlm writes beside a checkpoint ({} for files without one), checked by check_meta."""
    path = config_path_for(weights)
    return check_meta(read_json(path), path) if os.path.isfile(path) else {}


_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_meta(meta, path) -> dict:
    """Refuse a checkpoint JSON that cannot be what save_vlm wrote, naming the file and the field: the
    config must build (sizes sane, heads dividing, known projector), and a "sha256" that is not a table
    of real digests is an error, not a check silently skipped."""
    if not isinstance(meta, dict) or "vlm" not in meta:
        raise WeightsError(f"{path}: no \"vlm\" config (not a minivlm checkpoint JSON, or a damaged one)")
    vocab = config_from_file(VLMConfig, meta["vlm"], path).lm.vocab_size
    digests = meta.get("sha256", {})
    if not isinstance(digests, dict) or set(digests) - {"weights", "vision"}:
        raise WeightsError(f"{path}: field sha256 must map weights/vision to digests, got {digests!r:.80}")
    for part, digest in digests.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise WeightsError(f"{path}: field sha256.{part} {digest!r:.80} is not a sha256 hex digest")
    for name, kind, ok in (("step", int, lambda v: v >= 0), ("tokenizer_vocab_size", int, lambda v: v > 0),
                           ("placeholder_id", int, lambda v: 0 <= v < vocab), ("question_first", bool, None),
                           ("vision_folder", str, None), ("format", str, lambda v: v.startswith("minivlm-checkpoint"))):
        if name in meta:
            v = meta[name]
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)) or (ok and not ok(v)):
                raise WeightsError(f"{path}: field {name} has an unusable value {v!r:.80}")
    return meta


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def saved_files(weights, saved: dict, check_vision: bool) -> tuple[str, str | None]:
    """(weights file, vision folder) of the save the JSON vouches for: each where its sha256 matches,
    at its usual name or, while a save switches over, in the staging folder the JSON names. A JSON
    without "sha256" (older minivlm) vouches for nothing: the usual names are taken unchecked.
    The vision folder is None when the JSON records none; unchecked when the caller brings a tower."""
    folder = os.path.dirname(os.path.abspath(weights))
    staged = staged_by(weights, saved)
    digests, made = saved.get("sha256", {}), f"{config_path_for(weights)} (step {saved.get('step', '?')})"
    found = _matching(made, weights, [os.path.join(staged, os.path.basename(weights))] if staged else [],
                      digests.get("weights"))
    if "vision_folder" not in saved:
        return found, None
    usual = os.path.join(folder, saved["vision_folder"])
    if not check_vision:
        return found, usual
    file = _matching(made, os.path.join(usual, "model.safetensors"),
                     [os.path.join(staged, "vision", "model.safetensors")] if staged else [], digests.get("vision"))
    return found, os.path.dirname(file)


def _matching(made: str, usual: str, others: list, digest: str | None) -> str:
    """The first of `usual`, *others that exists with sha256 `digest` (any, when None); `usual` when none
    exists (its loader then says it is missing); a WeightsError when files exist but none matches."""
    present = [p for p in [usual, *others] if os.path.isfile(p)]
    for path in present:
        if digest is None or sha256_of(path) == digest:
            return path
    if not present:
        return usual
    raise WeightsError(f"{usual}: not the file saved with {made}: it was replaced, or put together from two "
                       f"saves; use the files of one save (or --resume the run to save again)")


def check_finite(model, source):
    """Refuse weights with NaN or infinity, naming the first such tensor."""
    for name, t in model.state_dict().items():
        # min and max carry a NaN or an infinity through, without a full-size temporary (isfinite makes
        # one per tensor: a bool copy, and a float one for bf16, ~17 MB of the 26m load's peak)
        if t.is_floating_point() and t.numel() and not torch.isfinite(torch.stack(t.aminmax())).all():
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
    # The files the JSON vouches for (sha256-checked): mid-save, some are still in the staging folder.
    file, vision_dir = saved_files(weights, saved, check_vision=vision is None) if saved else (weights, None)
    sd = to_2025_04(load_state_dict(file), heads)
    if saved:
        tied = saved["vlm"]["lm"].get("tie_word_embeddings", True)
        check_tying(sd, tied, weights)
    else:
        tied = file_is_tied(sd)  # no config to say: the file decides
    if tied:
        del sd["lm_head.weight"]  # the embeddings: re-tied below instead of converted twice
    for k in list(sd):  # before the tower is read: the file's copy of each tensor goes once converted
        sd[k] = sd.pop(k).to(dtype)
    kind = saved["vlm"].get("vision_type", "clip") if saved else ("siglip" if is_3v(sd) else "clip")
    vision_model = _vision_for(weights, vision, saved, dtype, vision_dir, kind)
    if saved:
        cfg = VLMConfig.from_dict(saved["vlm"])
        for k, v in config_overrides.items():
            setattr(cfg.lm, k, v)
        cfg.lm.__post_init__()
        if "placeholder_id" in saved:  # written beside the config by every minivlm version
            cfg.placeholder_id = saved["placeholder_id"]
    else:
        proj_keys = [k for k in sd if k.startswith("vision_proj.")]
        kind = ("ln_mlp" if "vision_proj.mlp.0.weight" in sd else
                "mlp2x_gelu" if "vision_proj.vision_proj.2.weight" in sd else
                "linear" if "vision_proj.vision_proj.0.weight" in sd else "identity")
        if not proj_keys and kind == "identity" and vision_model.config.hidden_size != sd["model.embed_tokens.weight"].shape[1]:
            raise WeightsError(f"{weights}: no projector weights (vision_proj.*) in the checkpoint")
        generation = dict(GENERATION_3V, projector_type=kind) if is_3v(sd) else dict(projector_type=kind)
        cfg = VLMConfig(lm=infer_lm_config(sd, tie_word_embeddings=tied, **config_overrides),
                        vision=vision_model.config, **generation)
    cfg.vision = vision_model.config
    # Decoder and projector without their random init, which the checkpoint would overwrite; the
    # checkpoint's tensors (converted one by one) then become the parameters. (The RoPE tables are
    # derived buffers, not in checkpoints: the constructor computes them, once.)
    with shapes_only():
        model = MiniMindVLM(cfg, vision_model=vision_model)
    check_state_dict(model.lm_state_dict(), {"lm_head.weight": sd["model.embed_tokens.weight"], **sd}, weights)
    model.load_state_dict(sd, strict=False, assign=True)  # vision keys: loaded with the tower
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    check_finite(model, weights)
    return model


def load_vision_tower(folder, dtype: torch.dtype | None = None):
    """A Hugging Face tower folder -> CLIPVisionModel or SiglipVisionModel, by its config.json's model_type."""
    path = os.path.join(os.fspath(folder), "config.json")
    raw = read_json(path) if os.path.isfile(path) else {}
    model_type = str(raw.get("model_type", "")) if isinstance(raw, dict) else ""
    tower = SiglipVisionModel if "siglip" in model_type else CLIPVisionModel
    return tower.from_pretrained(folder, dtype=dtype)


def _vision_for(weights, vision, saved, dtype, vision_dir, kind="clip"):
    """The tower load_vlm uses: given, from a folder, the one saved with the checkpoint (`vision_dir`,
    found by saved_files), or random. `kind` ("clip" / "siglip") is what the checkpoint needs; a tower of
    the other kind is refused (a minimind-3v checkpoint with CLIP would mix 64 with 196 image tokens)."""
    if isinstance(vision, (CLIPVisionModel, SiglipVisionModel)):
        tower = vision.to(dtype)  # in place (a no-op when it already is): one dtype for the whole model
    elif vision is not None:
        tower = load_vision_tower(vision, dtype)
    elif vision_dir is not None:  # a tower trained together with this checkpoint
        tower = load_vision_tower(vision_dir, dtype)
    else:
        fields = saved["vlm"]["vision"] if saved else {}
        warnings.warn(f"{weights}: no vision tower given (vision=...): it is randomly initialised, "
                      f"image features will be meaningless")
        return build_vision_tower(kind, VISION_CONFIGS[kind](**fields)).to(dtype)
    got = "siglip" if isinstance(tower, SiglipVisionModel) else "clip"
    if got != kind:
        want = "a SigLIP folder (minimind-3v)" if kind == "siglip" else "a CLIP folder (MiniMind-V)"
        raise WeightsError(f"{weights}: this checkpoint needs {want}, but the vision tower given is "
                           f"{'SigLIP' if got == 'siglip' else 'CLIP'}")
    return tower


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
    """Write the checkpoint (MiniMind-V 2025-04 layout, no CLIP keys) and `<name>.json` beside it, as one
    unit (see the module docstring): a kill at any instant leaves the previous save or this one loadable.
    vision_folder: a folder beside `path` to save the model's vision tower in (a trained tower travels
    with the checkpoint; load_vlm finds it through the JSON).
    question_first: the model was trained with questions before the images (eval_vlm.py's default).
    step, tokenizer_vocab_size: recorded, with the sha256 of each file, for load_vlm's checks."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    finish_save(path)  # a switch that a kill interrupted: completed first, its staging folder is reused
    staging = staging_folder(path)
    shutil.rmtree(staging, ignore_errors=True)  # what a save killed before its switch left: never vouched for
    os.makedirs(staging)
    staged = os.path.join(staging, os.path.basename(path))
    sd = {k: v.detach().to("cpu", dtype) for k, v in model.lm_state_dict().items()}
    atomic_write(staged, lambda f: torch.save(sd, f))
    meta = {"format": "minivlm-checkpoint-1", "vlm": model.vlm_config.to_dict(),
            "placeholder_id": model.placeholder_id, "question_first": question_first,
            "sha256": {"weights": sha256_of(staged)}}
    if step is not None:
        meta["step"] = step
    if tokenizer_vocab_size is not None:
        meta["tokenizer_vocab_size"] = tokenizer_vocab_size
    if vision_folder is not None:
        model.vision_encoder.save_pretrained(os.path.join(staging, "vision"))
        meta["vision_folder"] = os.path.relpath(vision_folder, folder)
        meta["sha256"]["vision"] = sha256_of(os.path.join(staging, "vision", "model.safetensors"))
    # The switch: one rename of the JSON, which from now on vouches for the staged files.
    atomic_write(config_path_for(path), json.dumps({**meta, "staged": os.path.basename(staging)}, indent=2).encode())
    finish_save(path)


def staging_folder(path) -> str:
    """Where save_vlm writes a save's files before the switch: `<name>.saving/` beside the checkpoint."""
    return os.path.splitext(os.path.abspath(path))[0] + ".saving"


def staged_by(path, meta: dict) -> str | None:
    """The staging folder a switched save's JSON names, or None. Only `<name>.saving` beside the checkpoint
    is ever one: anything else is a damaged JSON (finish_save removes the folder, so it is not trusted)."""
    if "staged" not in meta:
        return None
    staging = staging_folder(path)
    if meta["staged"] != os.path.basename(staging):
        raise WeightsError(f"{config_path_for(path)}: field staged {meta['staged']!r:.80} is not "
                           f"{os.path.basename(staging)!r} (a damaged checkpoint JSON)")
    return staging


def finish_save(path):
    """Complete a switched save (its JSON names a staging folder): link each staged file to its usual name
    (the vision tower's config.json before its weights, so that while only the config is new the weights
    still match nowhere but in staging, where the whole tower is), then drop "staged" from the JSON, then
    the staging folder. Idempotent: a kill anywhere in here is finished by the next call. A damaged JSON
    names nothing to finish: the save about to be written replaces it."""
    try:
        meta = read_meta(path)
        staging = staged_by(path, meta)
    except WeightsError:
        return
    if staging is None:
        return
    del meta["staged"]
    folder = os.path.dirname(os.path.abspath(path))
    pairs = [(os.path.join(staging, os.path.basename(path)), path)]
    if "vision_folder" in meta:
        tower = os.path.join(folder, meta["vision_folder"])
        os.makedirs(tower, exist_ok=True)
        pairs += [(os.path.join(staging, "vision", n), os.path.join(tower, n))
                  for n in ("config.json", "preprocessor_config.json", "model.safetensors")]
    for staged, usual in pairs:
        if os.path.isfile(staged):  # the staging folder is removed only after the JSON stops naming it
            atomic_link(staged, usual)
    atomic_write(config_path_for(path), json.dumps(meta, indent=2).encode())
    shutil.rmtree(staging, ignore_errors=True)


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
    template = getattr(tokenizer, "template", "minimind-v")
    if template != model.vlm_config.chat_template:
        raise WeightsError(f"{source}: a {template} tokenizer, but the model is {model.vlm_config.chat_template}: "
                           f"they do not belong together")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise WeightsError(f"{source}: tokenizer has {tokenizer.vocab_size} tokens, the model only "
                           f"{model.config.vocab_size}: they do not belong together")
    if trained_with is not None and tokenizer.vocab_size != trained_with:
        raise WeightsError(f"{source}: tokenizer has {tokenizer.vocab_size} tokens, but the checkpoint was "
                           f"trained with one of {trained_with}: they do not belong together")
    if tokenizer.placeholder_id != model.placeholder_id:
        raise WeightsError(f"{source}: the image placeholder is id {tokenizer.placeholder_id} here but {model.placeholder_id} "
                           f"in the checkpoint: they do not belong together")
