"""CLIP: golden outputs of the full model, the HF folder round trip, the loss, tokenization, hard-negative
batches, and zero-shot classification after a few steps of contrastive pretraining."""
import json
import math
import os
import random

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from minivlm.synthetic import world as shapes
from minivlm.clip.model import (CLIPModel, CLIPTextModel, CLIPTokenizer, TextConfig, clip_loss, encode_texts,
                          load_clip_tokenizer, zero_shot)
from minivlm.clip.train import evaluate, format_eval, main, sample_batch
from minivlm.data.tokenizer import Tokenizer
from minivlm.model.vision import CLIPVisionModel
from minivlm.model.weights import WeightsError, read_safetensors, write_safetensors

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
CLIP_DIR = os.path.join(FIX, "clip_tiny")
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ref():
    return torch.load(os.path.join(FIX, "clip_tiny_ref.pt"), weights_only=True)


@pytest.fixture(scope="module")
def clip_tiny():
    return CLIPModel.from_pretrained(CLIP_DIR).eval()


# ---------------------------------------------------------------------------------------------
# golden outputs (tests/fixtures/README.md)


def test_full_clip_matches_reference(clip_tiny, ref):
    px, ids = ref["pixel_values"].float(), ref["input_ids"]  # pixels are stored in float16: upcast
    with torch.no_grad():
        text = clip_tiny.text_model(ids)
        out = clip_tiny(ids, px)
        text_embeds, image_embeds = clip_tiny.get_text_features(ids), clip_tiny.get_image_features(px)
    # pooling at the *first* eos: row 0 has a second eos after it
    assert clip_tiny.text_model.eos_positions(ids).tolist() == ref["text_eos_positions"].tolist()
    torch.testing.assert_close(text.last_hidden_state, ref["text_last_hidden_state"], **TOL)
    torch.testing.assert_close(text.pooler_output, ref["text_pooler_output"], **TOL)
    torch.testing.assert_close(text_embeds, ref["text_embeds"], **TOL)
    torch.testing.assert_close(image_embeds, ref["image_embeds"], **TOL)
    torch.testing.assert_close(out.logits_per_image, ref["logits_per_image"], **TOL)
    torch.testing.assert_close(out.logits_per_text, ref["logits_per_text"], **TOL)
    torch.testing.assert_close(clip_tiny.logit_scale.detach(), ref["logit_scale"])
    # forward returns normalised embeddings
    torch.testing.assert_close(out.image_embeds, torch.nn.functional.normalize(ref["image_embeds"], dim=-1), **TOL)
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(len(ids)))


def test_config_uses_top_level_projection_dim(clip_tiny, ref):
    raw = json.load(open(os.path.join(CLIP_DIR, "config.json")))
    assert raw["text_config"]["projection_dim"] != raw["projection_dim"]  # the fixture's trap
    assert clip_tiny.config.projection_dim == raw["projection_dim"] == ref["image_embeds"].shape[1]
    assert clip_tiny.config.text.eos_token_id == raw["text_config"]["eos_token_id"]
    assert clip_tiny.config.text.pooling == "first_eos"


def test_attention_mask_and_text_model_alone(clip_tiny, ref):
    ids = ref["input_ids"]
    eos = ref["text_eos_positions"]
    mask = (torch.arange(ids.shape[1])[None] <= eos[:, None]).long()  # padding after the first eos
    text_model = CLIPTextModel.from_pretrained(CLIP_DIR).eval()
    with torch.no_grad():
        masked = clip_tiny.text_model(ids, attention_mask=mask)
        alone = text_model(ids)
    torch.testing.assert_close(masked.pooler_output, ref["text_pooler_output"], **TOL)
    torch.testing.assert_close(alone.last_hidden_state, ref["text_last_hidden_state"], **TOL)
    # a row whose real tokens start late (left padding) must not produce NaN
    left = torch.zeros_like(mask)
    left[:, 3:] = 1
    with torch.no_grad():
        assert torch.isfinite(clip_tiny.text_model(ids, attention_mask=left).last_hidden_state).all()


def test_pooling_rules():
    ids = torch.tensor([[5, 9, 7, 2, 0, 0]])
    # eos 7 (not 2): first occurrence of eos
    assert TextConfig(eos_token_id=7).pooling == "first_eos"
    # legacy configs say eos_token_id == 2: fall back to argmax of the ids, as the reference does
    legacy = TextConfig(eos_token_id=2, vocab_size=10, hidden_size=8, num_attention_heads=2, num_hidden_layers=1)
    assert legacy.pooling == "argmax"
    assert CLIPTextModel(legacy).text_model.eos_positions(ids).tolist() == [1]
    # minivlm tokenizers: eos id 2, pooled at the first eos because the config says so
    ours = TextConfig(eos_token_id=2, pooling="first_eos", vocab_size=10, hidden_size=8, num_attention_heads=2,
                      num_hidden_layers=1)
    assert CLIPTextModel(ours).text_model.eos_positions(ids).tolist() == [3]
    with pytest.raises(ValueError, match="pooling"):
        TextConfig(pooling="mean")


# ---------------------------------------------------------------------------------------------
# the Hugging Face folder layout


def test_save_pretrained_round_trip(clip_tiny, ref, tmp_path):
    clip_tiny.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    back = CLIPModel.from_pretrained(tmp_path).eval()
    assert back.config == clip_tiny.config
    a, b = clip_tiny.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    px, ids = ref["pixel_values"].float(), ref["input_ids"]
    vision = CLIPVisionModel.from_pretrained(tmp_path).eval()  # the vision-only loader reads it too
    assert vision.config.projection_dim == clip_tiny.config.projection_dim
    with torch.no_grad():
        torch.testing.assert_close(back(ids, px).logits_per_image, ref["logits_per_image"], **TOL)
        torch.testing.assert_close(vision(px).pooler_output, ref["pooler_output"], **TOL)
    keys = read_safetensors(tmp_path / "model.safetensors").keys()
    for k in ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
              "text_model.encoder.layers.1.mlp.fc2.bias", "text_model.final_layer_norm.weight",
              "vision_model.pre_layrnorm.weight", "visual_projection.weight", "text_projection.weight", "logit_scale"):
        assert k in keys
    assert "visual_projection.bias" not in keys and "text_projection.bias" not in keys


def test_from_pretrained_checks_keys(tmp_path):
    with pytest.raises(WeightsError, match="no text_config"):
        CLIPModel.from_pretrained(os.path.join(FIX, "clip_tiny_vision_bin"))
    sd = read_safetensors(os.path.join(CLIP_DIR, "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(CLIP_DIR, "config.json")).read())
    # legacy position_ids buffers are ignored
    extra = {**sd, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    write_safetensors(extra, tmp_path / "model.safetensors")
    CLIPModel.from_pretrained(tmp_path)
    missing = {k: v for k, v in sd.items() if k != "text_projection.weight"}
    write_safetensors(missing, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="1 missing: text_projection.weight"):
        CLIPModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# the loss


def test_clip_loss_is_symmetric():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = torch.tensor(math.log(20.0))
    torch.testing.assert_close(clip_loss(img, txt, scale), clip_loss(txt, img, scale))
    # embeddings are normalised inside: scaling an input changes nothing
    torch.testing.assert_close(clip_loss(3 * img, txt, scale), clip_loss(img, txt, scale))


def test_clip_loss_hand_worked_2x2():
    # images e1, e2; texts e1, (e1 + e2)/sqrt(2); temperature exp(ln 2) = 2
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # row 1 is normalised inside clip_loss
    s, r = 2.0, 1 / math.sqrt(2)
    # logits = 2 * [[1, r], [0, r]]: rows are images, columns texts
    image_to_text = (-math.log(math.exp(s) / (math.exp(s) + math.exp(s * r)))  # image 0 picks text 0
                     - math.log(math.exp(s * r) / (math.exp(0) + math.exp(s * r)))) / 2  # image 1 picks text 1
    text_to_image = (-math.log(math.exp(s) / (math.exp(s) + math.exp(0)))  # text 0: logits (2, 0)
                     - math.log(0.5)) / 2  # text 1: logits (2r, 2r), a coin toss
    expected = (image_to_text + text_to_image) / 2
    got = clip_loss(img, txt, math.log(2.0))
    assert abs(got.item() - expected) < 1e-6
    assert abs(expected - 0.5 * (0.3301 + 0.4100)) < 1e-4  # the same numbers, worked out on paper


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_encode_texts_minivlm_tokenizer(shapes_tokenizer_path):
    tok = CLIPTokenizer(Tokenizer.from_file(str(shapes_tokenizer_path)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # <|endoftext|>, <|im_start|>, <|im_end|>
    ids, mask = encode_texts(tok, ["a red circle", "a large blue star at the top left"], context_length=12)
    assert ids.shape == mask.shape == (2, 12)
    body = tok.encode("a red circle")
    assert ids[0, :len(body) + 2].tolist() == [1, *body, 2]
    assert (ids[0, len(body) + 2:] == 0).all() and mask[0].sum() == len(body) + 2
    # truncation keeps eos as the last token: that is where the text is pooled
    short, m = encode_texts(tok, ["a large blue star at the top left " * 5], context_length=8)
    assert short[0, 0] == 1 and short[0, -1] == 2 and m.all()
    assert short[0, 1:-1].tolist() == tok.encode("a large blue star at the top left " * 5)[:6]
    longest, _ = encode_texts(tok, ["a red circle"], pad_to_longest=True)
    assert longest.shape == (1, len(body) + 2)


def test_load_clip_tokenizer_openai_vocabulary(tmp_path):
    vocab = {w: i for i, w in enumerate(["a", "dog", "cat", "[UNK]"])}
    vocab.update({"<|startoftext|>": 4, "<|endoftext|>": 5})
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_clip_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (4, 5, 5)  # padded with <|endoftext|>, as the Hub does
    ids, mask = encode_texts(tok, ["a dog"], context_length=6)
    assert ids.tolist() == [[4, 0, 1, 5, 5, 5]] and mask.tolist() == [[1, 1, 1, 1, 0, 0]]
    with pytest.raises(FileNotFoundError):
        load_clip_tokenizer(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# hard-negative batches


def _edited(a, b):
    """The attributes in which scene b differs from scene a; they must be exactly one object apart."""
    key = lambda o: (o.shape, o.colour, o.size, o.cell)
    ka, kb = [key(o) for o in a.objects], [key(o) for o in b.objects]
    only_a, only_b = [k for k in ka if k not in kb], [k for k in kb if k not in ka]
    assert len(only_a) == len(only_b) == 1, (ka, kb)
    return {n for n, x, y in zip(("shape", "colour", "size", "position"), only_a[0], only_b[0]) if x != y}


def test_hard_negative_batches_are_minimal_pairs():
    items = sample_batch(random.Random(0), 64, hard_negatives=True, group_size=4)
    assert len(items) == 64
    assert len({c for _, c, _ in items}) == 64  # no caption twice
    edits, groups = [], {}
    for scene, _, seed in items:  # members of a group share the render seed: same background and jitter
        groups.setdefault(seed, []).append(scene)
    assert [len(g) for g in groups.values()] == [4] * 16
    for base, *edited in groups.values():
        for scene in edited:
            d = _edited(base, scene)
            assert len(d) == 1, d
            edits += d
    assert edits.count("shape") >= len(edits) // 3  # most edits change a shape
    plain = sample_batch(random.Random(0), 64, hard_negatives=False)
    assert len({seed for _, _, seed in plain}) == 64
    for scene, text, _ in plain:  # every caption is the scene's own, in one of the four phrasings
        assert text in {shapes.caption(scene, size, pos) for size in (True, False) for pos in (True, False)}


# ---------------------------------------------------------------------------------------------
# pretraining for a few steps, then zero-shot


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and immune to a busy machine
    try:
        # 120 steps of batch 32 with one layer per tower: colour is right for seeds 0-3 (tried), ~15 s.
        rc = main(["train", "--out", str(out), "--steps", "120", "--batch", "32", "--seed", "0", "--lr", "2e-3",
                   "--no-hard-negatives", "--vision-layers", "1", "--text-layers", "1", "--projection-dim", "32",
                   "--eval-n", "0", "--log-every", "40"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out


def _single(colour, seed):
    rng = random.Random(seed)
    scene = shapes.Scene([shapes.Obj("circle", colour, "large", rng.randrange(9))])
    return shapes.render(scene, 96, rng)


def test_train_saves_hub_layout(trained):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(trained))
    model = CLIPModel.from_pretrained(trained).eval()
    vision = CLIPVisionModel.from_pretrained(trained).eval()
    assert vision.config.image_size == 96 and vision.config.patch_size == 16
    px = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(vision(px).pooler_output, model.vision_model(px).pooler_output)
    tok = load_clip_tokenizer(trained)
    assert (tok.bos_id, tok.eos_id) == (model.config.text.bos_token_id, model.config.text.eos_token_id) == (1, 2)
    assert model.config.text.pooling == "first_eos"


def test_zero_shot_colour_after_a_few_steps(trained):
    model, tok = CLIPModel.from_pretrained(trained), load_clip_tokenizer(trained)
    colours = ["red", "green", "blue", "yellow"]
    images = [_single(c, 1000 + i) for i, c in enumerate(colours * 4)]  # held out: a stream training never uses
    probs = zero_shot(model, tok, images, [f"{c} circle" for c in colours], template="a {}")
    assert probs.shape == (16, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(16))
    assert probs.argmax(-1).tolist() == [0, 1, 2, 3] * 4
    results = evaluate(model, tok, n=8)
    assert set(results) >= {"colour", "shape", "shape swap (2-3 obj)"}
    assert "colour" in format_eval(results)


def test_classify_cli(trained, tmp_path, capsys):
    path = tmp_path / "red.png"
    _single("red", 7).save(path)
    rc = main(["classify", str(path), "--model", str(trained), "--labels", "a blue circle,a red circle,a green circle"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0] == str(path) and out[1].endswith("a red circle")
    assert len(out) == 4 and all(line.strip().split("%")[0].replace(".", "").isdigit() for line in out[1:])
    for argv, msg in ((["classify", str(tmp_path / "missing.png"), "--model", str(trained), "--labels", "a,b"],
                       "missing.png"),
                      (["classify", str(path), "--model", str(tmp_path / "nomodel"), "--labels", "a,b"], "config.json"),
                      (["classify", str(path), "--model", str(trained), "--labels", "a"], "two")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err
