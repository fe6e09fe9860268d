"""Tests for minivlm/generate.py: KV-cache decoding, batching, streaming, stopping, sampling, prompts."""

import copy
import io
import json

import pytest
import torch
import torch.nn as nn
from PIL import Image

from minivlm.model.config import LMConfig, VisionConfig, VLMConfig
from minivlm.infer.generate import (SamplingConfig, answer, answer_batch, generate, left_pad, sample_next, stream,
                              top_p_filter)
from minivlm.model.lm import KVCache, LMOutput, MiniMindLM
from minivlm.data.processing import preprocess_image
from minivlm.data.prompt import chat_prompt, expand_images, render_chat
from minivlm.data.tool import train_tokenizer
from minivlm.model.vlm import MiniMindVLM

SIZE = 32  # 32 px images, 16 px patches -> runs of 4 placeholders


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["A red square on the left.", "What colour is the circle?", "The circle is blue.",
             "两只小猫在草地上玩耍。", "小猫是白色的。", "Count: 1 2 3 4 5."]
    records = [{"conversations": [{"role": "user", "content": f"<image>\n{texts[i % 6]}"},
                                  {"role": "assistant", "content": texts[(i + 2) % 6]}], "image": "x.png"}
               for i in range(30)]
    path = tmp_path_factory.mktemp("tok") / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    return train_tokenizer([str(path)], vocab_size=400)


def lm_config(vocab_size, max_positions=512):
    return LMConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=max_positions)


def sharpen(model):
    """Re-initialise with large weights and switch to float64.

    At the default init (std 0.02) a tiny random model repeats one token with near-tied logits, so a
    1e-7 difference between two correct code paths could flip an argmax. Large weights give varied
    text with clear winners; float64 makes the remaining differences ~1e-15."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return model.double().eval()


@pytest.fixture(scope="module")
def vlm(tok):
    torch.manual_seed(0)
    cfg = VLMConfig(lm=lm_config(tok.vocab_size),
                    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=SIZE, patch_size=16))
    return sharpen(MiniMindVLM(cfg, placeholder_id=tok.placeholder_id))


def image(seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (SIZE + 8, SIZE, 3), generator=g, dtype=torch.uint8).numpy())


def vlm_inputs(tok, vlm, images, question):
    ids = chat_prompt(tok, [{"role": "user", "content": "<image>\n" * len(images) + question}], vlm.run_length)
    pixels = torch.stack([preprocess_image(im, SIZE) for im in images])[None] if images else None
    return torch.tensor([ids]), pixels


class ScriptedModel(nn.Module):
    """Same call signature as MiniMindLM; row b's i-th new token is script[b][i] (repeating the last).

    It checks the decoding contract on the way: after the prefill only one new token comes in, and
    the attention mask covers cached + new positions.
    """

    def __init__(self, script, vocab_size):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.script, self.vocab_size = script, vocab_size
        self.calls = []

    def step_logits(self, step, B):
        logits = torch.zeros(B, self.vocab_size)
        for b in range(B):
            logits[b, self.script[b][min(step, len(self.script[b]) - 1)]] = 10.0
        return logits

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, logits_to_keep=0):
        cache = past_key_values if past_key_values is not None else KVCache()
        B, T = input_ids.shape
        if cache.length == 0:
            self.prompt_len = T
        else:
            assert T == 1, "decoding must feed only the new token"
        if attention_mask is not None:
            assert attention_mask.shape == (B, cache.length + T)
        self.calls.append(T)
        cache.advance(T)
        logits = self.step_logits(cache.length - self.prompt_len, B)[:, None]  # (B, 1, V)
        return LMOutput(logits=logits, past_key_values=cache if use_cache else None)


class FixedLogitsModel(ScriptedModel):
    """Every step predicts the same logits vector."""

    def __init__(self, logits):
        super().__init__(None, len(logits))
        self.fixed = torch.tensor(logits)

    def step_logits(self, step, B):
        return self.fixed.expand(B, -1).clone()


# ---------------------------------------------------------------------------------------------
# KV cache and batching


def uncached_greedy(model, input_ids, n, **extra):
    """The slow reference: re-run the whole sequence every step and take the argmax."""
    seq = input_ids
    for _ in range(n):
        nxt = model(seq, **extra).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[:, input_ids.shape[1]:]


@torch.no_grad()
def test_kv_cache_generation_equals_uncached(tok, vlm):
    ids, pixels = vlm_inputs(tok, vlm, [image(1), image(2)], "What colour is the circle?")
    cfg = SamplingConfig(max_new_tokens=12)
    out = generate(vlm, ids, pixels, cfg=cfg, eos_id=None)
    assert out.shape == (1, 12)
    assert torch.equal(out, uncached_greedy(vlm, ids, 12, pixel_values=pixels))
    assert len(set(out[0].tolist())) > 3  # a real test: the model does not just repeat one token


@torch.no_grad()
def test_plain_lm_generation_equals_uncached():
    lm = sharpen(MiniMindLM(lm_config(300)))
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    out = generate(lm, ids, cfg=SamplingConfig(max_new_tokens=10), eos_id=None)
    assert torch.equal(out, uncached_greedy(lm, ids, 10))


def test_batched_left_padded_equals_one_by_one(tok, vlm):
    items = [([image(1), image(2)], "What colour is the circle?"),
             ([], "Count"),
             ([image(3)], "Describe the picture, 小猫."),
             ([image(4)], "Hi")]
    cfg = SamplingConfig(max_new_tokens=10)
    inputs = [vlm_inputs(tok, vlm, images, q) for images, q in items]
    # A random model hardly ever says <|im_end|>, so to see rows stop at different steps, call a
    # token that row 0 produces mid-answer "eos".
    free = generate(vlm, *inputs[0], cfg=cfg, eos_id=None)[0].tolist()
    stop = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])
    singles = [generate(vlm, ids, pixels, cfg=cfg, eos_id=stop, pad_id=tok.pad_id)[0].tolist()
               for ids, pixels in inputs]
    assert len(singles[0]) < cfg.max_new_tokens and singles[0][-1] == stop

    # The same rows as one left-padded batch with 0, 1 and 2 images per row.
    prompts = [ids[0].tolist() for ids, _ in inputs]
    ids, mask = left_pad(prompts, tok.pad_id)
    assert len({len(p) for p in prompts}) == len(prompts)  # really different lengths
    pixels = torch.zeros(len(items), 2, 3, SIZE, SIZE)
    for b, (images, _) in enumerate(items):
        for k, im in enumerate(images):
            pixels[b, k] = preprocess_image(im, SIZE)
    counts = torch.tensor([len(images) for images, _ in items])
    batch = generate(vlm, ids, pixels, counts, mask, cfg, eos_id=stop, pad_id=tok.pad_id)
    assert batch.shape[1] == max(len(s) for s in singles)
    for row, single in zip(batch.tolist(), singles):
        assert row[:len(single)] == single
        assert all(t == tok.pad_id for t in row[len(single):])

    # And the convenience wrappers (which stop at the real eos) agree with each other.
    texts = answer_batch(vlm, tok, items, cfg, SIZE)
    assert texts == [answer(vlm, tok, images, q, cfg, SIZE) for images, q in items]
    assert texts[1] == tok.decode(generate(vlm, *inputs[1], cfg=cfg, eos_id=tok.eos_id)[0])


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


# ---------------------------------------------------------------------------------------------
# Stopping


def test_eos_stops_a_row_and_pads_the_rest():
    eos, pad = 2, 0
    script = [[5, eos, 7],  # stops at step 1; the 7 must never appear
              [5, 6, 7, eos],  # stops at step 3
              [9]]  # never stops
    model = ScriptedModel(script, 16)
    ids, mask = left_pad([[3, 4], [3], [3, 4, 4]])
    out = generate(model, ids, attention_mask=mask, cfg=SamplingConfig(max_new_tokens=6), eos_id=eos, pad_id=pad)
    assert out.tolist() == [[5, eos, pad, pad, pad, pad],
                            [5, 6, 7, eos, pad, pad],
                            [9, 9, 9, 9, 9, 9]]  # max_new_tokens respected
    assert model.calls == [3, 1, 1, 1, 1, 1]  # prefill, then one token per step, none after the last

    # When every row has stopped, generation ends early: n_new is the last row's eos step + 1.
    out = generate(ScriptedModel(script[:2], 16), ids[:2], attention_mask=mask[:2],
                   cfg=SamplingConfig(max_new_tokens=50), eos_id=eos, pad_id=pad)
    assert out.tolist() == [[5, eos, pad, pad], [5, 6, 7, eos]]


def test_max_new_tokens_and_context_limit():
    lm = MiniMindLM(lm_config(50, max_positions=16)).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    assert generate(lm, ids, cfg=SamplingConfig(max_new_tokens=3), eos_id=None).shape == (1, 3)
    assert generate(lm, ids, cfg=SamplingConfig(max_new_tokens=0), eos_id=None).shape == (1, 0)
    # Asking for more than the RoPE table holds stops at its end instead of raising: 10 prompt
    # tokens + 6 fed-back tokens fill the 16 positions, and the 7th new token is never fed.
    assert generate(lm, ids, cfg=SamplingConfig(max_new_tokens=100), eos_id=None).shape == (1, 7)
    with pytest.raises(ValueError, match="max_position_embeddings"):  # a prompt too long already
        generate(lm, torch.arange(3, 20)[None], cfg=SamplingConfig(max_new_tokens=2), eos_id=None)


def test_generate_restores_training_mode_and_builds_no_graph():
    lm = MiniMindLM(lm_config(50)).train()
    seen = []
    lm.register_forward_hook(lambda m, i, o: seen.append((m.training, o.logits.requires_grad)))
    generate(lm, torch.tensor([[3, 4, 5]]), cfg=SamplingConfig(max_new_tokens=3), eos_id=None)
    assert seen == [(False, False)] * 3  # eval mode, no autograd graph, while decoding
    assert lm.training  # and the caller's mode is back


# ---------------------------------------------------------------------------------------------
# Streaming


def test_stream_never_splits_a_character(tok):
    # Byte-level BPE cuts rare characters into byte pieces: '龘' is 3 tokens, and a token of '草地'
    # holds the end of '草' and the start of '地'. Script those pieces, plus a trailing lone byte.
    text = "猫 龘 é! 草地"
    pieces = tok.encode(text)
    partial = [tok.decode(pieces[:k]) for k in range(1, len(pieces) + 1)]
    assert any(p.endswith("\ufffd") for p in partial)  # the script does split characters
    lone_byte = tok.encode("龘")[0]
    for script, expected in [(pieces + [tok.eos_id], text), (pieces + [lone_byte, tok.eos_id], text + "\ufffd")]:
        model = ScriptedModel([script], tok.vocab_size)
        ids = torch.tensor([[tok.bos_id, 5, 6]])
        cfg = SamplingConfig(max_new_tokens=30)
        chunks = list(stream(model, tok, ids, cfg=cfg))
        assert "".join(chunks) == expected
        assert not any("\ufffd" in c for c in chunks[:-1])  # no half character was ever emitted
        assert len(chunks) > 3  # it really streamed
        full = generate(ScriptedModel([script], tok.vocab_size), ids, cfg=cfg, eos_id=tok.eos_id, pad_id=tok.pad_id)
        assert "".join(chunks) == tok.decode(full[0], skip_special_tokens=True)


def test_stream_equals_generate_on_a_real_model(tok, vlm):
    ids, pixels = vlm_inputs(tok, vlm, [image(5)], "两只小猫?")
    cfg = SamplingConfig(max_new_tokens=15, temperature=1.0, seed=3)
    full = generate(vlm, ids, pixels, cfg=cfg, eos_id=tok.eos_id, pad_id=tok.pad_id)
    assert "".join(stream(vlm, tok, ids, pixels, cfg=cfg)) == tok.decode(full[0], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# Sampling


def test_seeded_sampling_is_reproducible(tok, vlm):
    ids, pixels = vlm_inputs(tok, vlm, [image(1)], "Describe the picture.")

    def run(**kw):
        return generate(vlm, ids, pixels, cfg=SamplingConfig(max_new_tokens=20, temperature=1.5, **kw), eos_id=None)

    assert torch.equal(run(seed=1), run(seed=1))
    assert not torch.equal(run(seed=1), run(seed=2))
    greedy = generate(vlm, ids, pixels, cfg=SamplingConfig(max_new_tokens=20), eos_id=None)
    assert torch.equal(run(seed=1, top_k=1), greedy)
    assert torch.equal(run(seed=1, top_p=1e-6), greedy)


def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert torch.isfinite(top_p_filter(logits, 0.75)).tolist() == [[True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.85)).tolist() == [[True, True, True]]
    assert torch.isfinite(top_p_filter(logits, 0.0)).tolist() == [[True, False, False]]  # top token stays
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, None, SamplingConfig(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert picks == {0, 1}  # top-k=2: the third token is never drawn, both others are


def test_repetition_penalty():
    cfg = SamplingConfig(repetition_penalty=2.0)
    logits = torch.tensor([[3.0, 2.0, -1.0, -1.5]])
    # Token 0 was seen: 3.0 -> 1.5, so token 1 wins. Padding (-1) in the history counts for nothing.
    assert sample_next(logits, torch.tensor([[-1, 0, -1]]), cfg).tolist() == [1]
    assert sample_next(logits, torch.tensor([[-1, -1]]), cfg).tolist() == [0]
    # Negative logits are multiplied: seen token 2 goes from -1.0 to -2.0, below token 3.
    only_neg = torch.tensor([[-5.0, -6.0, -1.0, -1.5]])
    assert sample_next(only_neg, torch.tensor([[2]]), cfg).tolist() == [2 + 1]

    # Inside generate the penalty sees the tokens generated so far: 7 (3.0) wins, then is penalised
    # to 1.5 so 8 (2.0) wins, then both are penalised and 7 wins again.
    fixed = [0.0] * 10
    fixed[7], fixed[8] = 3.0, 2.0
    ids = torch.tensor([[1, 2, 3]])
    out = generate(FixedLogitsModel(fixed), ids, cfg=SamplingConfig(max_new_tokens=3, repetition_penalty=2.0),
                   eos_id=None)
    assert out.tolist() == [[7, 8, 7]]
    out = generate(FixedLogitsModel(fixed), ids, cfg=SamplingConfig(max_new_tokens=3), eos_id=None)
    assert out.tolist() == [[7, 7, 7]]


# ---------------------------------------------------------------------------------------------
# Prompts


def test_chat_prompt_matches_the_template(tok):
    messages = [{"role": "user", "content": "<image>\n<image>\nWhat is at a@b.c <|im_end|>?"}]
    ids = chat_prompt(tok, messages, run_length=4)
    expanded = [{"role": "user", "content": expand_images(messages[0]["content"], 4)}]
    assert ids == tok.encode(render_chat(expanded, add_generation_prompt=True))
    assert ids.count(tok.placeholder_id) == 8  # two runs; the e-mail's '@' was sanitised
    assert ids.count(tok.eos_id) == 2  # system + user turns; the typed '<|im_end|>' is plain text
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_answer_places_images_at_the_markers_of_the_question(tok, vlm):
    with pytest.raises(ValueError, match=r"2 <image> marker\(s\) but 1 image"):
        answer(vlm, tok, [image(1)], "what is <image> and <image>?", SamplingConfig(max_new_tokens=2), SIZE)
    # markers placed by the question itself are used where they stand
    cfg = SamplingConfig(max_new_tokens=3)
    q_first = answer(vlm, tok, [image(1)], "what is this?\n<image>", cfg, SIZE)
    ids = chat_prompt(tok, [{"role": "user", "content": "what is this?\n<image>"}], vlm.run_length)
    pv = preprocess_image(image(1), SIZE)[None, None]
    out = generate(vlm, torch.tensor([ids]), pv, cfg=cfg, eos_id=tok.eos_id, pad_id=tok.pad_id)[0].tolist()
    assert q_first == tok.decode(out[:out.index(tok.eos_id)] if tok.eos_id in out else out)


# ---------------------------------------------------------------------------------------------
# generate(..., compiled=True): batch 1 through one compiled graph per step


def test_compiled_decoding_gives_the_eager_tokens_and_falls_back_where_it_cannot():
    import mmap
    from minivlm.infer import compiled_decode, hugepages
    torch.manual_seed(3)
    lm = MiniMindLM(LMConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, qk_norm=True)).eval()
    prompt = torch.randint(3, 300, (1, 20))
    greedy = SamplingConfig(max_new_tokens=24)
    eager = generate(lm, prompt, cfg=greedy, eos_id=None)
    assert torch.equal(generate(lm, prompt, cfg=greedy, eos_id=None, compiled=True), eager)
    [fast] = lm._compiled_decoders.values()  # it did decode through the compiled step: one, capacity 256
    assert fast.capacity == 256 and fast.keys[0].shape == (2, 256, 16)
    # the step packed the decoder's weights in huge pages (where the OS has them); eager reads them alike
    decoder_weights = [*lm.model.parameters(), lm.lm_head.weight]
    assert hugepages.is_packed(decoder_weights) == hasattr(mmap, "MADV_HUGEPAGE")
    assert torch.equal(generate(lm, prompt, cfg=greedy, eos_id=None), eager)
    # sampling draws from the same distribution with the same generator
    sampled = SamplingConfig(max_new_tokens=24, temperature=0.8, top_k=50, seed=5)
    assert torch.equal(generate(lm, prompt, cfg=sampled, eos_id=None, compiled=True),
                       generate(lm, prompt, cfg=sampled, eos_id=None))
    # a batch of two (left-padded) decodes eagerly, as before
    ids, mask = left_pad([prompt[0].tolist(), prompt[0, :12].tolist()])
    assert not compiled_decode.supported(lm, 2, mask)
    assert torch.equal(generate(lm, ids, attention_mask=mask, cfg=greedy, eos_id=None, compiled=True),
                       generate(lm, ids, attention_mask=mask, cfg=greedy, eos_id=None))
    assert compiled_decode.decoder_for(lm, 300).capacity == 512  # room for 300 positions: the next power of two
    # a copy decodes with its own weights (a copied step would read the original's), and the model still pickles
    twin = copy.deepcopy(lm)
    assert not twin._compiled_decoders and not hugepages.is_packed([*twin.model.parameters()])
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1)
    assert torch.equal(generate(twin, prompt, cfg=greedy, eos_id=None, compiled=True),
                       generate(twin, prompt, cfg=greedy, eos_id=None))
    buffer = io.BytesIO()
    torch.save(lm, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert not loaded._compiled_decoders
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), lm.state_dict().values()))


def test_compiled_decoding_of_an_moe_decoder_falls_back_to_eager():
    """An MoE step picks its experts from the data, which one static graph cannot: the same tokens, no
    compiled step made, and the weights left where they were."""
    from minivlm.infer import compiled_decode
    torch.manual_seed(4)
    lm = MiniMindLM(LMConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, use_moe=True)).eval()
    prompt = torch.randint(3, 300, (1, 12))
    greedy = SamplingConfig(max_new_tokens=10)
    assert not compiled_decode.supported(lm, 1, None)
    storages = [p.untyped_storage().data_ptr() for p in lm.parameters()]
    assert torch.equal(generate(lm, prompt, cfg=greedy, eos_id=None, compiled=True),
                       generate(lm, prompt, cfg=greedy, eos_id=None))
    assert not lm.__dict__.get("_compiled_decoders")
    assert [p.untyped_storage().data_ptr() for p in lm.parameters()] == storages
