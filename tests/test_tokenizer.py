"""Tests for minivlm/tokenizer.py: training, special ids, ChatML rendering, placeholders, forging."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from minivlm.data.prompt import FULLWIDTH_AT, chat_pieces, expand_images, image_placeholder, render_chat, sanitize_text
from minivlm.data.tokenizer import Tokenizer
from minivlm.data.tool import tokenizer_main as main, train_tokenizer

SENTENCES = [
    "A red square sits on the left of a blue circle.",
    "What colour is the triangle? It is green.",
    "Describe the image in one sentence.",
    "The cat sleeps on a warm windowsill, mail me at cat@example.com",
    "两只小猫在草地上玩耍。",
    "Numbers like 12345 and 3.14 appear too!",
]


def write_corpus(path, n=60):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            user = f"<image>\n{SENTENCES[i % len(SENTENCES)]} #{i}"
            answer = SENTENCES[(i + 1) % len(SENTENCES)]
            conv = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"conversations": conv, "image": f"{i}.png"}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "train.jsonl")


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer([str(corpus)], vocab_size=500)


# --- training, loading, saving ----------------------------------------------------------------

def test_special_ids_and_vocab(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 500
    assert tok.encode("<|endoftext|><|im_start|><|im_end|>") == [0, 1, 2]
    assert tok.encode("") == []


def test_roundtrip_any_text(tok):
    # the full 256-byte alphabet means text never seen in training still encodes and decodes
    for text in ["hello world", "Ünïcödé ✓ 🐱", "两只小猫", "tabs\tand\nnewlines  ", "ǅ ̈ \x00"]:
        assert tok.decode(tok.encode(text)) == text


def test_decode_skips_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_save_and_load_file_or_folder(tok, tmp_path):
    tok.save(tmp_path / "tk")
    for path in [tmp_path / "tk", tmp_path / "tk" / "tokenizer.json"]:
        loaded = Tokenizer.from_file(str(path))
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode("A red square.") == tok.encode("A red square.")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_file(str(tmp_path / "nowhere"))


def test_missing_special_token_is_a_clear_error(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(["some text"], trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json.*<\|im_end\|>"):
        Tokenizer.from_file(str(tmp_path))


def test_small_corpus_gives_fewer_merges_without_failing(corpus, tmp_path):
    tok = train_tokenizer([str(corpus)], vocab_size=6400, out_dir=str(tmp_path / "out"))
    assert tok.vocab_size < 6400
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_cli_train(corpus, tmp_path, capsys):
    main(["train", "--data", str(corpus), str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert "vocab size" in out and "sample" in out
    assert Tokenizer.from_file(str(tmp_path / "cli")).vocab_size <= 400
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    assert "--vocab-size" in capsys.readouterr().out


def test_training_rejects_bad_lines_with_location(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": []}\n\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3:"):
        train_tokenizer([str(bad)], vocab_size=300)


# --- chat template ----------------------------------------------------------------------------

SYS = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"


def test_render_single_turn_default_system():
    msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    assert render_chat(msgs) == (SYS + "<|im_start|>user\nHi?<|im_end|>\n"
                                 "<|im_start|>assistant\nHello.<|im_end|>\n")


def test_render_with_system_message():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}]
    assert render_chat(msgs) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                 "<|im_start|>user\nHi?<|im_end|>\n"
                                 "<|im_start|>assistant\nHello.<|im_end|>\n")


def test_render_multi_turn():
    msgs = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
            {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]
    assert render_chat(msgs) == (SYS + "<|im_start|>user\nA<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n"
                                 "<|im_start|>user\nC<|im_end|>\n<|im_start|>assistant\nD<|im_end|>\n")


def test_render_generation_prompt():
    msgs = [{"role": "user", "content": "What is this?"}]
    assert render_chat(msgs) == SYS + "<|im_start|>user\nWhat is this?<|im_end|>\n"
    assert render_chat(msgs, add_generation_prompt=True) == (
        SYS + "<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_pieces_mark_only_answers_trained():
    msgs = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]
    trained = [text for text, t in chat_pieces(msgs) if t]
    assert trained == ["B<|im_end|>", "\n"]  # MiniMind-V labels `<|im_end|>\n`
    assert "".join(text for text, _ in chat_pieces(msgs)) == render_chat(msgs)


# --- placeholders and forging -----------------------------------------------------------------

def test_placeholder_run_is_run_length_single_ids(tok):
    pid = tok.placeholder_id
    tok.check_placeholder(196)
    assert tok.encode("@" * 196) == [pid] * 196
    assert tok._tok.encode("@" * 196).ids == [pid] * 196  # the vocabulary itself, not just encode's split
    # no learned token contains '@': it can never be merged with its neighbours
    assert [t for t in tok._tok.get_vocab() if "@" in t] == ["@"]
    # in context (after a space, before punctuation) the run stays whole
    ids = tok.encode(render_chat([{"role": "user", "content": expand_images("look at <image>.", 196)}]))
    start = ids.index(pid)
    assert ids.count(pid) == 196 and ids[start:start + 196] == [pid] * 196


def test_vocabulary_that_merges_at_is_reported(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(["@@@@ @@ @@@@"] * 10, trainer=trainer)
    tok = Tokenizer(hf)
    with pytest.raises(ValueError, match="merges '@'"):
        tok.check_placeholder(196)
    assert tok.encode("x @@@") == tok.encode("x ") + [tok.placeholder_id] * 3  # encode still safe


def test_sanitize_and_expand():
    assert sanitize_text("mail a@b.c") == f"mail a{FULLWIDTH_AT}b.c"
    assert sanitize_text("<|im_end|>") == "< |im_end|>"
    assert sanitize_text("<<||") == "<< ||"
    assert image_placeholder(3) == "@@@"
    assert expand_images("a@b <image> and <image>", 2) == f"a{FULLWIDTH_AT}b @@ and @@"


@pytest.mark.parametrize("text", ["@@@", "@" * 196, "me@example.com", "@ @@ @@@"])
def test_user_at_signs_cannot_forge_placeholders(tok, text):
    ids = tok.encode(render_chat([{"role": "user", "content": expand_images(text, 196)}]))
    assert tok.placeholder_id not in ids
    ids = tok.encode(render_chat([{"role": "user", "content": expand_images(text + "<image>", 196)}]))
    assert ids.count(tok.placeholder_id) == 196


@pytest.mark.parametrize("text", ["<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>", "<<|im_end|>|>"])
def test_user_cannot_forge_special_tokens(tok, text):
    ids = tok.encode(expand_images(text, 4))
    assert not set(ids) & {tok.pad_id, tok.bos_id, tok.eos_id}
    full = tok.encode(render_chat([{"role": "user", "content": expand_images(text, 4)}]))
    assert full.count(tok.eos_id) == 2 and full.count(tok.bos_id) == 2  # only the template's own
