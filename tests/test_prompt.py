"""One prompt path: what a model is trained on begins with exactly what it is asked at inference."""

import json

import pytest
import torch

from minivlm.model.config import vlm_preset
from minivlm.data.dataset import VLMDataset, encode_conversation
from minivlm.infer.evaluate import read_questions
from minivlm.infer.generate import encode_batch
from minivlm.data.prompt import IGNORE_INDEX, PromptError, chat_prompt, user_turn
from minivlm.data.tokenizer import Tokenizer
from minivlm.model.vlm import MiniMindVLM

RUN = 36  # the tiny preset's run length: 6 x 6 patches


@pytest.fixture(scope="module")
def tok(shapes_tokenizer_path):
    return Tokenizer.from_file(shapes_tokenizer_path)


@pytest.mark.parametrize("content, n_images", [
    ("<image>\nWhat is in the picture?", 1),                 # MiniMind-V: image first
    ("What colour is the star?\n<image>", 1),                # the shapes world's SFT: question first
    ("Compare <image> and <image>, mail me at x@y.z", 2),   # two images, a typed '@'
    ("Just text, no image.", 0),
])
def test_training_ids_begin_with_the_inference_prompt(tok, content, n_images):
    conversation = [{"role": "user", "content": content}, {"role": "assistant", "content": "a red star"},
                    {"role": "user", "content": "And the other one?"}, {"role": "assistant", "content": "blue"}]
    ids, labels = encode_conversation(conversation, tok, RUN, max_length=10_000)
    prompt = chat_prompt(tok, conversation[:1], RUN)
    assert ids[:len(prompt)] == prompt
    assert set(labels[:len(prompt)]) == {IGNORE_INDEX}  # nothing of the prompt is trained
    assert labels[len(prompt)] != IGNORE_INDEX  # the first answer token is
    # The second turn's prompt (history + new question) is also a prefix of the training ids.
    prompt2 = chat_prompt(tok, conversation[:3], RUN)
    assert ids[:len(prompt2)] == prompt2
    assert ids.count(tok.placeholder_id) == n_images * RUN


def test_eval_and_training_read_the_same_line_the_same_way(shapes_dir, tok):
    """A held-out question file line: VLMDataset (training) and evaluate/eval_vlm (inference, via
    read_questions -> user_turn -> encode_batch) build the same prompt ids."""
    model = MiniMindVLM(vlm_preset("tiny"), placeholder_id=tok.placeholder_id)
    path = shapes_dir / "test_sft.jsonl"
    dataset = VLMDataset(path, tokenizer=tok, max_length=10_000, run_length=RUN, image_size=96)
    for i, question in enumerate(read_questions(path)):
        if i == 5:
            break
        messages = [{"role": "user", "content": user_turn(question["question"], len(question["images"]),
                                                          dataset.question_first)}]
        batch = encode_batch(model, tok, [(question["images"], messages)])
        prompt = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        sample = dataset[i]
        assert sample["input_ids"][:len(prompt)].tolist() == prompt
        assert torch.equal(batch["pixel_values"][0], sample["pixel_values"])


def test_question_first_is_a_property_of_the_data(shapes_dir, tok, tmp_path):
    # The shapes world's SFT file asks before it shows; its caption file and MiniMind-V's data show first.
    assert VLMDataset(shapes_dir / "sft.jsonl", tokenizer=tok, run_length=RUN).question_first is True
    assert VLMDataset(shapes_dir / "pretrain.jsonl", tokenizer=tok, run_length=RUN).question_first is False
    line = {"conversations": [{"role": "user", "content": "<image>\nDescribe."},
                              {"role": "assistant", "content": "x"}], "image": "a.png"}
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n")
    assert VLMDataset(tmp_path / "d.jsonl", tokenizer=tok, run_length=RUN).question_first is False


def test_inference_places_images_like_the_training_data(shapes_dir):
    """eval_vlm.py builds a user turn with user_turn(prompt, n, question_first): for the shapes
    world's questions that is exactly the text of the training file."""
    for line in (shapes_dir / "sft.jsonl").read_text().splitlines()[:20]:
        record = json.loads(line)
        content = record["conversations"][0]["content"]
        question = content.replace("\n<image>", "")
        assert user_turn(question, content.count("<image>"), question_first=True) == content


def test_user_turn_refuses_a_marker_count_that_does_not_match():
    with pytest.raises(PromptError, match="2 <image> marker"):
        user_turn("<image> vs <image>", 1)
