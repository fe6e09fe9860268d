"""minivlm: a minimal, readable vision-language model (CLIP ViT + projector + MiniMind decoder).

The packages follow one image from pixels to the answer:

    data/       tokenizer, prompt (ChatML, '@' runs, labels), processing (CLIP preprocessing), datasets
    model/      config, vision (CLIP ViT; siglip: minimind-3v's), projector, lm (MiniMind decoder), vlm (splice,
                loss), checkpoints
    train/      TrainConfig, the loop behind train_pretrain.py / train_sft.py, optimiser, resume, feature cache
    infer/      generate (KV cache, sampling), evaluate, the eval_vlm.py command
    web/        the local page that shows where the model looks (python -m minivlm.web)
    synthetic/  the offline shapes world: scenes, datasets, scoring, attention supervision
    clip/       CLIP's text tower, contrastive training and zero-shot (python -m minivlm.clip)
    recipe/     the shipped demo model, made from nothing by one command (python -m minivlm.recipe)
    lab/        experiments on trained models: probes, growing the decoder
    bench/      benchmarks (python -m minivlm.bench)

Imports flow one way, down this list read from the bottom (bench uses everything, data uses nothing
but `common`). `tokenizer.py`, `features.py`, `grow.py` and `probe.py` here are command shims for
`python -m minivlm.<name>`. The names below are the public API; everything else may move.
"""

from .data.dataset import DataError, VLMDataset, collate_vlm
from .data.parquet import ParquetVLMDataset
from .data.processing import ImageTransform, load_image, preprocess_image
from .data.prompt import chat_prompt, encode_chat, render_chat
from .data.tokenizer import Tokenizer
from .infer.generate import SamplingConfig, answer, generate
from .model.checkpoint import load_vlm, load_with_tokenizer, save_vlm
from .model.config import LMConfig, SiglipVisionConfig, VisionConfig, VLMConfig, vlm_preset
from .model.lm import MiniMindLM
from .model.siglip import SiglipVisionModel
from .model.vision import CLIPVisionModel
from .model.vlm import MiniMindVLM
from .train.config import TrainConfig
from .train.optim import make_optimizer, set_trainable

__version__ = "0.1.0"

__all__ = [
    "CLIPVisionModel", "DataError", "ImageTransform", "LMConfig", "SiglipVisionConfig", "SiglipVisionModel", "MiniMindLM", "MiniMindVLM", "ParquetVLMDataset", "SamplingConfig",
    "Tokenizer", "TrainConfig", "VLMConfig", "VLMDataset", "VisionConfig", "answer", "chat_prompt",
    "collate_vlm", "encode_chat", "generate", "load_image", "load_vlm", "load_with_tokenizer", "make_optimizer",
    "preprocess_image", "render_chat", "save_vlm", "set_trainable", "vlm_preset",
]
