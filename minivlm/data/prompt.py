"""The one road from a conversation to token ids, for training and for answering alike.

    messages [{"role", "content"}, ...]   one `<image>` marker per image in the user text
      --sanitize_text-->   typed '@' and '<|' can no longer forge placeholder or special tokens
      --expand_images-->   each `<image>` becomes run_length '@' (196 for CLIP ViT-B/16)
      --chat_pieces-->     the ChatML template as (text, trained) pieces
      --encode_chat-->     input_ids, and labels that keep only the trained pieces

The template (ChatML, as MiniMind's tokenizer_config renders it):

    <|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n      (unless a system turn comes first)
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n
    ...

minimind-3v's template (`template="minimind-3v"`, chosen by a tokenizer that has `<|image_pad|>`) differs
in three ways: no default system turn, every assistant turn opens with a think block
`<think>\n{reasoning}\n</think>\n\n` (empty unless the answer holds one; trained, as MiniMind-V labels
everything after `<|im_start|>assistant\n`), and the generation prompt ends in the empty block. Images are
runs of 64 `<|image_pad|>`. minivlm always renders the block; MiniMind-V's trainer drops an empty one from
80 % of samples and adds a random system prompt to 20 %, which are data augmentations, not the template.

Every piece is encoded on its own and the ids are concatenated. The pieces are cut at special tokens
and at the start of each answer, which is exactly where an inference prompt stops, so the prompt the
model sees when answering is token for token the start of the conversation it was trained on.

Forging rule (`sanitize_text`, applied to all message text before markers are expanded):
  * every literal '@' becomes the full-width look-alike '＠' (U+FF20). Its UTF-8 bytes never
    contain the byte 0x40, so no text a user types can add placeholder ids: an e-mail address
    cannot break or fake an image run. After sanitizing, the only '@' left are placeholder runs.
  * every "<|" becomes "< |". All special tokens start with "<|", so after this no special token
    string survives in user text: a user typing "<|im_end|>" gets ordinary text tokens, not the
    eos id. (The rule covers special tokens of the form "<|...|>", which is all MiniMind has.)
  * minimind-3v: '@' is ordinary text there (the placeholder is a special token), and every added token
    of its tokenizer (also `<think>`, `<tool_call>`) gets the same break after its "<".
"""

from __future__ import annotations

from .tokenizer import BOS_TOKEN, EOS_TOKEN, IMAGE_PAD, PLACEHOLDER

IMAGE_MARKER = "<image>"  # where an image goes in a message; becomes a run of placeholders
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"
FULLWIDTH_AT = "\uff20"  # '＠', what a literal '@' in message text turns into
IGNORE_INDEX = -100  # the label of a token that is not trained (what torch's cross_entropy skips)


class PromptError(ValueError):
    """A prompt that cannot be asked: `<image>` markers that do not match the images given, or text that
    is not valid Unicode."""


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode text, or None. The one rule for text from outside (data files,
    typed prompts, stdin): a lone surrogate ("\\ud800" is valid JSON; Python decodes an undecodable byte
    of argv or stdin to one) cannot be encoded to UTF-8, so the tokenizer would fail on it with a
    TypeError deep inside. Callers turn the answer into their own error (DataError, PromptError)."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for an undecodable byte
            return f"byte 0x{code - 0xDC00:02x} at character {e.start} is not UTF-8"
        return f"lone surrogate U+{code:04X} at character {e.start} (not valid Unicode)"
    return None


def check_text(text: str) -> str:
    """`text`, or a PromptError saying why it is not valid Unicode (`unicode_problem`)."""
    problem = unicode_problem(text)
    if problem:
        raise PromptError(f"invalid text: {problem}")
    return text


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TEMPLATES = ("minimind-v", "minimind-3v")


def sanitize_text(text: str, template: str = "minimind-v", added_tokens=()) -> str:
    """Make message text unable to forge placeholder ids or special tokens (see module docstring). Every
    message passes here before it is tokenized, so text that is not valid Unicode stops here at the latest
    (a PromptError, not the tokenizer's TypeError); readers refuse it earlier, naming its place.
    added_tokens: the tokenizer's added token strings (minimind-3v: each is broken after its '<')."""
    text = check_text(text)
    if template == "minimind-3v":
        for token in added_tokens:
            text = text.replace(token, "< " + token[1:])
        return text.replace("<|", "< |")
    return text.replace(PLACEHOLDER, FULLWIDTH_AT).replace("<|", "< |")


def image_placeholder(run_length: int, template: str = "minimind-v") -> str:
    return (IMAGE_PAD if template == "minimind-3v" else PLACEHOLDER) * run_length


def expand_images(text: str, run_length: int, template: str = "minimind-v", added_tokens=()) -> str:
    """Sanitize `text`, then replace each `<image>` marker with a run of `run_length` placeholders."""
    return sanitize_text(text, template, added_tokens).replace(IMAGE_MARKER, image_placeholder(run_length, template))


def user_turn(question: str, n_images: int, question_first: bool = False) -> str:
    """The content of a user turn asking `question` about `n_images` images.

    A question that already holds `<image>` markers (as a question file may) keeps them where they
    stand, and their number must match. Otherwise one marker per image goes before the question
    (MiniMind-V's convention) or, with question_first, after it: in a causal decoder the image tokens
    can then attend to the question (the shapes world's SFT data is written this way). Text that is not
    valid Unicode is a PromptError (`unicode_problem`): typed text is checked here, file text by `parse_json`.
    """
    n = check_text(question).count(IMAGE_MARKER)
    if n:
        if n != n_images:
            raise PromptError(f"the question has {n} {IMAGE_MARKER} marker(s) but {n_images} image(s) were given")
        return question
    markers = f"{IMAGE_MARKER}\n" * n_images
    return f"{question}\n{markers}".rstrip("\n") if question_first else markers + question


def split_think(content: str) -> tuple[str, str]:
    """minimind-3v: an assistant message -> (reasoning, answer); reasoning is what stands before `</think>`
    (after `<think>`, newlines trimmed), "" when there is none."""
    if THINK_CLOSE not in content:
        return "", content
    reasoning = content.split(THINK_CLOSE)[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
    return reasoning.strip("\n"), content.split(THINK_CLOSE)[-1].lstrip("\n")


def chat_pieces(messages: list[dict], add_generation_prompt: bool = False, template: str = "minimind-v",
                expand=lambda text: text) -> list[tuple[str, bool]]:
    """The rendered chat as a list of (text, trained) pieces; ''.join(texts) == render_chat(...).

    `trained` is True exactly for each assistant answer, the `<|im_end|>` that closes it and the "\n"
    after that: the model must learn to say the answer and then to stop, and MiniMind-V (both versions)
    labels `<|im_end|>\n`, so minivlm does too. The header `<|im_start|>assistant\n` is its own
    untrained piece because at inference the prompt ends there and the answer starts a new token; the
    trailing "\n" is its own piece too, so the ids equal those of encoding the whole text at once.
    minimind-3v: the think block and the answer are one piece (trained), so their ids are those of the
    whole text, which is what MiniMind-V's trainer encodes. `expand` is applied to the text of each message
    (to the reasoning and the answer apart, so that only the template writes a think block): `encode_chat`
    passes the image expansion and forging rule; rendering uses the text as given.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r} (choose from {', '.join(TEMPLATES)})")
    v3 = template == "minimind-3v"
    pieces = []
    if not v3 and (not messages or messages[0]["role"] != "system"):
        pieces.append((f"{BOS_TOKEN}system\n{DEFAULT_SYSTEM_PROMPT}{EOS_TOKEN}\n", False))
    for m in messages:
        role = m["role"]
        if role == "assistant" and v3:
            reasoning, answer = (expand(t) for t in split_think(m["content"]))
            content = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}"
        else:
            content = expand(m["content"])
        if role == "assistant":
            pieces += [(f"{BOS_TOKEN}assistant\n", False), (content + EOS_TOKEN, True), ("\n", True)]
        else:
            pieces.append((f"{BOS_TOKEN}{role}\n{content}{EOS_TOKEN}\n", False))
    if add_generation_prompt:
        pieces.append((f"{BOS_TOKEN}assistant\n", False))
        if v3:  # thinking off: the answer follows an empty block
            pieces.append((f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n", False))
    return pieces


def render_chat(messages: list[dict], add_generation_prompt: bool = False, template: str = "minimind-v") -> str:
    """Render [{"role", "content"}, ...] as ChatML text (MiniMind-V's, or minimind-3v's with think blocks)."""
    return "".join(text for text, _ in chat_pieces(messages, add_generation_prompt, template))


def encode_chat(tokenizer, messages: list[dict], run_length: int,
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Messages -> (input_ids, labels), two equally long lists of ints; labels are IGNORE_INDEX
    outside the trained pieces (not shifted: the loss shifts). `<image>` markers are expanded here, and
    the tokenizer's generation decides the template (`tokenizer.template`).

    This equals `tokenizer.encode(render_chat(...))` for ordinary text (tests check it). An answer
    starting with 2+ spaces may differ: whole-text BPE would glue the header's "\n" to a space, which
    inference, whose prompt ends at that "\n", never sees.
    """
    template = getattr(tokenizer, "template", "minimind-v")
    added = getattr(tokenizer, "added_tokens", ())
    expand = lambda text: expand_images(text, run_length, template, added)
    input_ids, labels = [], []
    for text, trained in chat_pieces(messages, add_generation_prompt, template, expand):
        ids = tokenizer.encode(text)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def chat_prompt(tokenizer, messages: list[dict], run_length: int) -> list[int]:
    """Messages -> prompt ids ending in `<|im_start|>assistant\\n`, ready for generation."""
    return encode_chat(tokenizer, messages, run_length, add_generation_prompt=True)[0]
