"""Decoding: turn a prompt (+ images) into new tokens, one at a time, with a KV cache.

    prompt ids (B, T) + pixel_values ──prefill──▶ logits of the last position + KV cache
        loop:  pick a token from the logits (greedy or sampled)
               feed ONLY that token (the cache holds everything before it) ──▶ next logits

The prefill is the only step that sees the images: their features are inside the cached keys and
values afterwards. Each decoding step then feeds one new token through the weights; only its attention
still reads all the cached keys and values, so a step grows slowly with the length, not with its square.

Batches are left-padded (`left_pad`): every row's last prompt token then sits in the same column,
so one forward call yields "the next token" of every row. The attention mask tells the model which
columns are padding; it derives positions from the mask, so a padded row decodes exactly as it would
alone.

    generate(model, ids, ...)        -> LongTensor (B, n_new)   tokens, eos included, pad after it
    stream(model, tok, ids, ...)     -> Iterator[str]           text pieces, never half a character
    answer(model, tok, images, q)    -> str                     prompt building + generate + decode
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from . import compiled_decode
from ..data.processing import as_transform
from ..data.prompt import chat_prompt, user_turn


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (argmax); otherwise logits are divided by it
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    top_k: int = 0  # keep only the k most likely tokens; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or answer; 1.0 = off
    seed: int | None = None  # None = torch's global RNG; an int makes sampling reproducible


# ---------------------------------------------------------------------------------------------
# Choosing one token


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): make every token already seen less likely.

    A positive logit is divided by the penalty and a negative one multiplied by it, so both move
    down (dividing a negative logit would move it *up*). Entries of seen_ids < 0 are ignored: callers
    use -1 for padding, which must not count as "seen" (it would make batches differ from single runs).
    """
    valid = seen_ids >= 0
    # A count per (row, token) instead of a boolean scatter: scatter_ with duplicate indices keeps an
    # arbitrary one of the written values, scatter_add_ sums them all, deterministically.
    counts = torch.zeros_like(logits).scatter_add_(1, seen_ids.clamp(min=0), valid.to(logits.dtype))
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1), the k-th largest
    return logits.masked_fill(logits < kth, float("-inf"))


# "The Curious Case of Neural Text Degeneration", Holtzman et al. 2019
def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= p; -inf the rest."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of all strictly more likely tokens
    # A token is needed while the tokens before it do not yet reach p. The top token has nothing
    # before it, so it always survives, even for p <= 0.
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, generated_ids: torch.Tensor | None, cfg: SamplingConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row. logits (B, V); generated_ids (B, L) = prompt + answer so far
    (entries < 0 are ignored), used only by the repetition penalty. Returns LongTensor (B,).

    Order: repetition penalty -> temperature -> top-k -> top-p -> sample (or argmax when greedy).
    """
    logits = logits.float()  # softmax and cumsum in bf16 lose too much
    if cfg.repetition_penalty != 1.0 and generated_ids is not None and generated_ids.numel():
        logits = apply_repetition_penalty(logits, generated_ids.to(logits.device), cfg.repetition_penalty)
    if cfg.temperature <= 0:
        # top-k and top-p always keep the most likely token, so they cannot change the argmax.
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    logits = top_p_filter(top_k_filter(logits, cfg.top_k), cfg.top_p)
    probs = logits.softmax(dim=-1)  # filtered tokens: exp(-inf) = 0
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------------
# The decoding loop


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _decode_steps(model, input_ids, pixel_values, image_counts, attention_mask, cfg, eos_id, pad_id,
                  compiled=False):
    """Yield the next token of every row, LongTensor (B,), once per step.

    Shared by `generate` (which collects the steps) and `stream` (which turns them into text as
    they come). Rows that have produced eos_id yield pad_id from then on; the loop ends when every
    row is done or max_new_tokens steps were taken.
    """
    B, T = input_ids.shape
    limit = cfg.max_new_tokens
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and T <= max_pos:
        # Stop where the model's RoPE table ends instead of raising mid-answer. The last token is
        # never fed back, so it needs no position: T + n - 1 <= max_pos. (A prompt that is already
        # too long is left to the prefill, which raises.)
        limit = min(limit, max_pos - T + 1)
    if limit <= 0:
        return
    device = input_ids.device
    generator = None
    if cfg.seed is not None:  # a private generator: reproducible, and the global RNG is left alone
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)

    # The ids the repetition penalty counts as "seen": the prompt (padding marked -1) + the answer.
    history = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -1)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    # Prefill: the whole prompt once, images included; keep only the last position's logits.
    extra = {}
    if pixel_values is not None:  # MiniMindLM has no such arguments, so pass them only when used
        extra["pixel_values"] = pixel_values
        if image_counts is not None:
            extra["image_counts"] = image_counts
    out = model(input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1, **extra)
    cache, logits = out.past_key_values, out.logits[:, -1]
    fast = None
    if compiled and compiled_decode.supported(model, B, attention_mask):
        fast = compiled_decode.decoder_for(model, T + limit)  # batch 1: one compiled graph per step
        fast.start(cache, T)

    for step in range(limit):
        tok = sample_next(logits, history, cfg, generator)  # (B,)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)  # finished rows only pad
        if eos_id is not None:
            done = done | (tok == eos_id)
        yield tok
        if bool(done.all()) or step == limit - 1:
            return  # no forward pass for a token nobody will sample after
        history = torch.cat([history, torch.where(done, -1, tok)[:, None]], dim=1)
        if attention_mask is not None:  # the mask covers cached + new positions
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        # Only the new token goes in: everything before it is already in the cache.
        if fast is not None:
            logits = fast.step(tok, T + step)
            continue
        out = model(tok[:, None], attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1]


class _eval_mode:
    """Dropout off while decoding; the caller's train/eval mode is restored afterwards, so sampling
    in the middle of a training loop neither needs nor leaks a model.eval()."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
             image_counts: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             cfg: SamplingConfig | None = None, eos_id: int | None = 2, pad_id: int = 0,
             compiled: bool = False) -> torch.Tensor:
    """Continue each row of input_ids (B, T); returns the new tokens, LongTensor (B, n_new).

    A row that emits eos_id keeps it and is pad_id afterwards; n_new is the number of steps taken
    (<= max_new_tokens: fewer when every row stopped early). For a batch of prompts of different
    lengths, left-pad them (`left_pad`) and pass the attention_mask. pixel_values (B, N, 3, S, S)
    with image_counts (B,) for a VLM; leave them None for a plain MiniMindLM.

    compiled=True: a batch of one (dense decoder, no padding) decodes through one compiled graph per
    step (compiled_decode.py; the first call compiles, seconds to a minute); otherwise it is ignored.
    """
    cfg = cfg or SamplingConfig()
    with _eval_mode(model):
        steps = list(_decode_steps(model, input_ids, pixel_values, image_counts, attention_mask, cfg,
                                   eos_id, pad_id, compiled))
    if not steps:
        return input_ids.new_zeros(input_ids.shape[0], 0)
    return torch.stack(steps, dim=1)


def left_pad(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (input_ids, attention_mask), both LongTensor (B, T_max).

    Padding goes on the left so that every prompt ends in the last column: that is where the next
    token of every row is predicted, and where each new token is appended.
    """
    T = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), T, dtype=torch.long)
    for b, s in enumerate(sequences):
        if s:
            input_ids[b, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            attention_mask[b, T - len(s):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def stream(model, tokenizer, input_ids, pixel_values=None, image_counts=None, attention_mask=None,
           cfg: SamplingConfig | None = None, compiled: bool = False) -> Iterator[str]:
    """Generate for one prompt (batch size 1) and yield the text as it grows; it stops at the
    tokenizer's eos, which is not emitted.

    One token may hold only part of a character (byte-level BPE splits a 3-byte Chinese character
    freely), and decoding an incomplete UTF-8 sequence gives the replacement character U+FFFD. So
    the ids so far are decoded at every step and the new text is emitted only once it does not end
    in U+FFFD; at the end whatever is left is flushed. Hence "".join(stream(...)) equals decoding
    all the generated ids at once. compiled: as in `generate`.
    """
    if not torch.is_tensor(input_ids):
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long, device=_model_device(model))
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream handles one prompt at a time, got a batch of {input_ids.shape[0]}")
    cfg = cfg or SamplingConfig()
    eos_id = tokenizer.eos_id
    ids, emitted = [], ""
    with _eval_mode(model):
        for tok in _decode_steps(model, input_ids, pixel_values, image_counts, attention_mask, cfg,
                                 eos_id, tokenizer.pad_id, compiled):
            t = int(tok[0])
            if t == eos_id:
                break
            ids.append(t)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd") or len(text) <= len(emitted):
                continue  # half a character (or nothing new): wait for the next token
            yield text[len(emitted):]
            emitted = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > len(emitted):  # e.g. a trailing byte that never got completed
        yield text[len(emitted):]


# ---------------------------------------------------------------------------------------------
# From questions and images to answers (the prompt itself is built by prompt.py)


def _cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def encode_batch(model, tokenizer, items: list[tuple[list, list[dict]]], image_size: int | None = None) -> dict:
    """[(images, messages), ...] -> the model's inputs on its device, as one left-padded batch:
    input_ids and attention_mask (B, T); pixel_values (B, N_max, 3, S, S), zero-padded, and image_counts
    (B,) saying how many of each row's N_max slots are real (both None when no item has an image)."""
    prep = as_transform(image_size or model.vlm_config.image_transform)  # the model's own preparation
    device = _model_device(model)
    prompts = [chat_prompt(tokenizer, messages, model.run_length) for _, messages in items]
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_id)
    counts = [len(images) for images, _ in items]
    pixel_values = image_counts = None
    if max(counts) > 0:
        pixel_values = torch.zeros(len(items), max(counts), 3, prep.size, prep.size)
        for b, (images, _) in enumerate(items):
            for k, im in enumerate(images):
                pixel_values[b, k] = prep(im)
        pixel_values = pixel_values.to(device)
        image_counts = torch.tensor(counts, device=device)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "pixel_values": pixel_values, "image_counts": image_counts}


def answer_batch(model, tokenizer, items: list[tuple[list, str]], cfg: SamplingConfig | None = None,
                 image_size: int | None = None, question_first: bool = False) -> list[str]:
    """[(images, question), ...] -> one answer string per item, generated as one left-padded batch.
    Items may hold different numbers of images (zero included). Images go where the question's
    `<image>` markers stand, else before the question (after it with question_first)."""
    messages = [[{"role": "user", "content": user_turn(q, len(images), question_first)}] for images, q in items]
    batch = encode_batch(model, tokenizer, [(images, m) for (images, _), m in zip(items, messages)], image_size)
    out = generate(model, batch["input_ids"], batch["pixel_values"], batch["image_counts"], batch["attention_mask"],
                   cfg, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    return [tokenizer.decode(_cut_at_eos(row, tokenizer.eos_id), skip_special_tokens=True)
            for row in out.tolist()]


def answer(model, tokenizer, images: list, question: str, cfg: SamplingConfig | None = None,
           image_size: int | None = None, question_first: bool = False) -> str:
    """Ask one question about zero or more PIL images; returns the model's answer as text."""
    return answer_batch(model, tokenizer, [(images, question)], cfg, image_size, question_first)[0]
