"""Decoding while a learner watches: what `python -m minivlm.web` shows next to each answer.

    watch(model, batch, cfg, eos_id)  -> one record per new token: its probability, the top-5 alternatives,
                                         and the token's attention onto every image patch, per layer
    prompt_pieces(tokenizer, ids, …)  -> the prompt as the page shows it, each image run as one block

`watch` is `generate`'s loop (notebook 7, section 1) with the attention weights switched on; tokens are
chosen by the same `sample_next` from the same logits, so greedy answers are identical.
"""

from __future__ import annotations

import time

import torch

from ..common import sync
from ..infer.generate import SamplingConfig, sample_next

TOP_K_SHOWN = 5  # alternatives shown per generated token


@torch.no_grad()
def watch(model, batch: dict, cfg: SamplingConfig, eos_id: int):
    """`generate`'s loop for one prompt, yielding a record per new token (eos included):

        id, p (the model's probability of it, before temperature), top ([id, p] x 5),
        attn (layers, image positions): the new token's attention onto every '@' position, mean over heads,
        ms: the time of the forward pass that scored it (the first one is the prefill).

    Each token is chosen by `generate.sample_next` from the same logits, so greedy tokens equal
    `generate`'s. The forward passes return attention weights (output_attentions=True: lm.py then
    computes softmax(q k^T / sqrt(d)) by hand, the "eager" path). The row that matters for token t is
    that of the position which *predicted* it: the prompt's last position for the first token, then each
    fed-back token. Stop early by closing the generator.
    """
    model.eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    device, T = ids.device, ids.shape[1]
    image_pos = (ids[0] == model.placeholder_id).nonzero().flatten()  # every image run, in order
    limit = min(cfg.max_new_tokens, model.config.max_position_embeddings - T + 1)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)
    history = ids
    start = time.perf_counter()
    # Prefill in two calls: all but the last prompt token (images spliced in, no weights kept: they would
    # be layers x heads x T x T), then the last token alone, whose attention row is the one shown.
    images = {"pixel_values": batch["pixel_values"], "image_counts": batch["image_counts"]}
    last = ids
    if T > 1:
        past = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, logits_to_keep=1, **images)
        images, last = {"past_key_values": past.past_key_values}, ids[:, -1:]
    out = model(last, attention_mask=mask, use_cache=True, logits_to_keep=1, output_attentions=True, **images)
    for step in range(limit):
        sync(device)
        ms = (time.perf_counter() - start) * 1000
        logits = out.logits[:, -1]
        probs = logits[0].float().softmax(-1)
        tok = sample_next(logits, history, cfg, generator)
        t = int(tok[0])
        top = probs.topk(min(TOP_K_SHOWN, probs.numel()))
        attn = torch.stack([a[0, :, -1, image_pos] for a in out.attentions]).float().mean(1)  # (layers, P)
        yield {"id": t, "p": probs[t].item(), "ms": ms, "attn": attn.cpu(),
               "top": [[i, v] for i, v in zip(top.indices.tolist(), top.values.tolist())]}
        if t == eos_id or step == limit - 1:
            return
        history = torch.cat([history, tok[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        start = time.perf_counter()
        out = model(tok[:, None], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True,
                    logits_to_keep=1, output_attentions=True)


def prompt_pieces(tokenizer, ids: list[int], placeholder_id: int, run_length: int) -> list[dict]:
    """The prompt as the page shows it: one {"kind": "text"|"special", "id", "text"} per token, except that
    each run of `run_length` placeholder ids becomes one {"kind": "image", "index", "count", "start"}."""
    special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    pieces, i, image = [], 0, 0
    while i < len(ids):
        if ids[i] == placeholder_id:
            pieces.append({"kind": "image", "index": image, "count": run_length, "start": i,
                           "text": tokenizer.decode([placeholder_id], skip_special_tokens=False)})
            i, image = i + run_length, image + 1
            continue
        pieces.append({"kind": "special" if ids[i] in special else "text", "id": ids[i],
                       "text": tokenizer.decode([ids[i]], skip_special_tokens=False)})
        i += 1
    return pieces
