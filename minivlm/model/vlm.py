"""The vision-language model: MiniMind's decoder that can also read images.

    input_ids (B, T) with a run of 196 '@' ids where each image goes
        --embed_tokens-->                          token embeddings (B, T, 512)
    pixel_values (B, N, 3, 224, 224)
        --CLIP--> (M, 196, 768) --projector--> (M, 196, 512)   M = real images in the batch
    splice: the embeddings of run k of sample b are replaced by image k of sample b
        --> decoder --> logits (B, T, 6400)

minimind-3v (preset "3v") has the same road with other parts: SigLIP (B, N, 3, 256, 256) -> (M, 64, 768),
an LN+MLP projector -> (M, 64, 768), and runs of 64 `<|image_pad|>` ids (12) instead of 196 '@'.

The image features enter the decoder exactly where the placeholders were, so the decoder "reads"
196 image tokens the way it reads words. Only the prefill step sees images: once their keys and values
sit in the KV cache, decoding never runs the vision tower again.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import VLMConfig
from .lm import LMOutput, MiniMindLM
from .projector import VisionProjector
from .siglip import SiglipVisionModel
from .vision import CLIPVisionModel


def build_vision_tower(vision_type: str, vision_config):
    """A randomly initialised tower of this kind: "clip" (MiniMind-V) or "siglip" (minimind-3v)."""
    return SiglipVisionModel(vision_config) if vision_type == "siglip" else CLIPVisionModel(vision_config)


def find_image_runs(input_ids: torch.Tensor, placeholder_id: int, run_length: int) -> torch.Tensor:
    """Where do images go? Returns a bool (B, T) marking the first token of every image run.

    A maximal stretch of placeholder ids of length m * run_length holds m images back to back; any
    other length is a broken run and raises ValueError naming the sample.
    """
    B, T = input_ids.shape
    is_ph = input_ids == placeholder_id  # (B, T)
    starts = torch.zeros_like(is_ph)
    if T >= run_length:
        # unfold views every window of run_length consecutive ids: (B, T - L + 1, L).
        full = is_ph.unfold(1, run_length, 1).all(dim=-1)  # window made only of placeholders
        # Offset of each token inside its stretch of placeholders, so that a stretch of 2L ids
        # yields windows starting at offsets 0 and L (two images), not at every position.
        idx = torch.arange(T, device=input_ids.device).expand(B, T)
        last_other = torch.where(is_ph, -1, idx).cummax(dim=1).values  # last non-placeholder so far
        offset = idx - last_other - 1
        starts[:, :T - run_length + 1] = full & (offset[:, :T - run_length + 1] % run_length == 0)
    n_ph, n_runs = is_ph.sum(dim=1), starts.sum(dim=1)
    bad = (n_ph != n_runs * run_length).nonzero().flatten().tolist()
    if bad:
        b = bad[0]
        raise ValueError(f"sample {b}: {int(n_ph[b])} placeholder tokens do not form whole runs of "
                         f"{run_length} (found {int(n_runs[b])} complete run(s)); a run was cut or a "
                         f"stray placeholder sits next to one")
    return starts


class MiniMindVLM(MiniMindLM):
    """MiniMindLM + a vision tower (CLIP, or SigLIP for minimind-3v; frozen unless a recipe trains it) + a
    projector. Checkpoint keys are MiniMind-V's names: `model.*`, `lm_head.weight`, `vision_proj.vision_proj.0.*`
    (minimind-3v: `vision_proj.mlp.{0,1,3}.*`); the tower is stored apart, in its Hugging Face folder."""

    def __init__(self, config: VLMConfig | None = None, vision_model: CLIPVisionModel | SiglipVisionModel | None = None,
                 placeholder_id: int | None = None):
        config = config or VLMConfig()
        if placeholder_id is not None:  # the tokenizer's '@' id, when it differs from the config's
            config = dataclasses.replace(config, placeholder_id=placeholder_id)
        super().__init__(config.lm)
        self.vlm_config = config
        self.vision_encoder = (vision_model if vision_model is not None
                               else build_vision_tower(config.vision_type, config.vision))
        self.vision_encoder.requires_grad_(False)  # frozen unless a training recipe unfreezes it
        self.vision_proj = VisionProjector(config.projector_type, config.vision.hidden_size, config.lm.hidden_size)
        self.vision_proj.apply(self._init_weights)
        self._decoder = None  # compile_decoder(): the compiled decoder forward

    def compile_decoder(self, **compile_kwargs):
        """torch.compile the decoder (everything after the splice) as one graph.

        Compiling the whole VLM would break the graph at every data-dependent step of the splice
        (nonzero, the run-count checks: 8 breaks). Those stay eager here, and fullgraph=True makes any
        break in the decoder an error instead of a silent slowdown."""
        self._decoder = torch.compile(super().forward, fullgraph=True, **compile_kwargs)
        return self

    @property
    def placeholder_id(self) -> int:
        return self.vlm_config.placeholder_id

    @property
    def run_length(self) -> int:
        return self.vlm_config.run_length

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> projected image embeddings (M, run_length, lm hidden)."""
        vision_trainable = any(p.requires_grad for p in self.vision_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trainable):
            feats = self.vision_encoder.select_features(pixel_values)  # (M, 196, 768)
        return self.vision_proj(feats)  # (M, 196, 512)

    def splice_images(self, input_ids, embeds, pixel_values, image_counts=None, image_features=None):
        """Write image k of sample b over run k of sample b. Vectorised: one indexed assignment.

        pixel_values: (B, N, 3, H, W), or (B, 3, H, W) for one image each. image_counts (B,) says how
        many of the N slots of each sample are real (the rest is padding); default: all N.
        image_features: (B, N, 196, 768), the vision tower's output computed beforehand (features.py's
        cache), given instead of pixel_values: the tower is then not run.
        """
        cached = image_features is not None
        slots = image_features if cached else (pixel_values[:, None] if pixel_values.dim() == 4 else pixel_values)
        B, N = slots.shape[:2]  # (B, N, 3, H, W) images, or (B, N, 196, 768) cached features
        if B != input_ids.shape[0]:
            raise ValueError(f"{'image_features' if cached else 'pixel_values'} has {B} samples but input_ids has "
                             f"{input_ids.shape[0]}")
        starts = find_image_runs(input_ids, self.placeholder_id, self.run_length)  # (B, T)
        runs = starts.sum(dim=1)  # (B,)
        counts = (torch.full((B,), N, device=input_ids.device) if image_counts is None
                  else image_counts.to(input_ids.device))
        if not torch.equal(runs, counts):
            b = int((runs != counts).nonzero()[0])
            raise ValueError(f"sample {b}: {int(runs[b])} image placeholder run(s) but {int(counts[b])} "
                             f"image(s) given")
        if not runs.any():
            return embeds
        real = torch.arange(N, device=counts.device)[None, :] < counts[:, None]  # (B, N)
        # (M, L, h), ordered by (sample, image); cached features skip the tower
        images = self.vision_proj(slots[real]) if cached else self.encode_images(slots[real])
        b_idx, s_idx = starts.nonzero(as_tuple=True)  # (M,) each, same (sample, run) order
        pos = s_idx[:, None] + torch.arange(self.run_length, device=s_idx.device)  # (M, L)
        embeds = embeds.clone()
        embeds[b_idx[:, None], pos] = images.to(embeds.dtype)
        return embeds

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, past_key_values=None,
                use_cache=False, image_counts=None, logits_to_keep=0, position_ids=None,
                output_attentions=False, image_features=None, return_logits=True,
                labelled_last_block=True) -> LMOutput:
        embeds = self.model.embed_tokens(input_ids)  # (B, T, h)
        prefill = past_key_values is None or past_key_values.length == 0
        if (pixel_values is not None or image_features is not None) and prefill:
            embeds = self.splice_images(input_ids, embeds, pixel_values, image_counts, image_features)
        elif prefill and (input_ids == self.placeholder_id).any():
            find_image_runs(input_ids, self.placeholder_id, self.run_length)  # broken runs still raise
            raise ValueError("the prompt holds image placeholder runs but no pixel_values were given")
        # The compiled decoder serves training and single forwards; decoding with a KV cache stays eager.
        compiled = self._decoder is not None and past_key_values is None and not use_cache
        decoder = self._decoder if compiled else super().forward
        # The labelled-positions-only loss selects rows with a boolean mask, a graph break: compiled, it
        # keeps every position's logits.
        return_logits = return_logits or compiled
        return decoder(inputs_embeds=embeds, attention_mask=attention_mask, past_key_values=past_key_values,
                       use_cache=use_cache, logits_to_keep=logits_to_keep, position_ids=position_ids,
                       labels=labels, output_attentions=output_attentions, return_logits=return_logits,
                       labelled_last_block=labelled_last_block)

    def lm_state_dict(self) -> dict:
        """The weights a MiniMind-V checkpoint holds: everything but the (separately stored) CLIP tower."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vision_encoder.")}

    def train(self, mode: bool = True):
        super().train(mode)
        if not any(p.requires_grad for p in self.vision_encoder.parameters()):
            self.vision_encoder.eval()  # a frozen tower stays in eval mode
        return self
