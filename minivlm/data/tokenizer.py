"""The tokenizer: byte-level BPE with ChatML's special tokens and a one-token image placeholder.

`Tokenizer` wraps a `tokenizers.Tokenizer` (MiniMind's `minimind_tokenizer/tokenizer.json`, or one
trained here with `train_tokenizer`). Ids 0/1/2 are `<|endoftext|>` (pad), `<|im_start|>` (bos) and
`<|im_end|>` (eos). Every '@' encodes to exactly one placeholder id (34 in MiniMind's vocabulary): a run
of 196 of them stands for one image, and the VLM later finds these runs by id and overwrites their
embeddings with the image features. How a conversation becomes text and ids is `prompt.py`'s job.

Training one on data files is `tool.py`'s job (`python -m minivlm.tokenizer train`); `train_bpe` is the core.
"""

import os
import re

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..common import atomic_write

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # trained tokenizers get ids 0, 1, 2
PLACEHOLDER = "@"  # one placeholder id per image feature
IMAGE_PAD = "<|image_pad|>"  # minimind-3v's placeholder: a special token (id 12), 64 per image
# minimind-3v's tokenizer opens with these 36 added tokens, ids 0-35 in this order (train_bpe makes the same).
SPECIAL_TOKENS_3V = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                     "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|vision_pad|>", IMAGE_PAD, "<|video_pad|>", "<|audio_start|>", "<|audio_end|>",
                     "<|audio_pad|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
                     "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
                     *(f"<|buffer{i}|>" for i in range(1, 10))]

_AT_RUNS = re.compile(r"(@+)")  # capturing group: re.split keeps the runs


def read_tokenizer_json(path):
    """`tokenizer.json`, or a folder holding one -> (tokenizers.Tokenizer, the file's path)."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else os.fspath(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no such tokenizer file")
    try:
        return _HFTokenizer.from_file(file), file
    except Exception as e:  # tokenizers raises a bare Exception on malformed json
        raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None


class Tokenizer:
    """Byte-level BPE tokenizer with the three ChatML special tokens and a one-token image placeholder.

    Two generations: MiniMind-V's (placeholder '@', template "minimind-v") and minimind-3v's, recognised by
    its `<|image_pad|>` token (the placeholder, template "minimind-3v", data/prompt.py)."""

    def __init__(self, hf_tokenizer, source="<in memory>"):
        self._tok = hf_tokenizer
        self.source = source  # named in error messages
        # They must be *added* special tokens: a plain vocabulary entry with the same text would not be
        # matched as one piece when a rendered chat is encoded.
        added = {t.content: i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
        ids = {t: added.get(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{source}: tokenizer lacks the special token(s) {', '.join(missing)}")
        self.pad_id, self.bos_id, self.eos_id = ids[PAD_TOKEN], ids[BOS_TOKEN], ids[EOS_TOKEN]
        # Every added token (special or not: 3v's <think> is not) is matched whole in text: prompt.py keeps
        # typed text from spelling one.
        self.added_tokens = sorted((t.content for t in hf_tokenizer.get_added_tokens_decoder().values()),
                                   key=len, reverse=True)
        self.template = "minimind-3v" if IMAGE_PAD in added else "minimind-v"
        self.placeholder = IMAGE_PAD if self.template == "minimind-3v" else PLACEHOLDER
        self._placeholder_id = added.get(IMAGE_PAD)  # '@': looked up lazily, see placeholder_id

    @classmethod
    def from_file(cls, path):
        """Load `tokenizer.json`, or a folder holding one (like MiniMind's `minimind_tokenizer/`)."""
        hf, file = read_tokenizer_json(path)
        return cls(hf, source=file)

    def save(self, folder):
        """Write `folder/tokenizer.json` atomically: a failed write (a full disk) leaves the old file whole."""
        os.makedirs(folder, exist_ok=True)
        atomic_write(os.path.join(folder, "tokenizer.json"), self._tok.to_str(pretty=True).encode())

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def placeholder_id(self):
        """Id of the single token ('@', or 3v's <|image_pad|>) that fills image placeholder runs."""
        if self._placeholder_id is None:
            ids = self._tok.encode(PLACEHOLDER, add_special_tokens=False).ids
            if len(ids) != 1:
                raise ValueError(f"{self.source}: '@' is not a single token (encodes to {ids}), "
                                 "it cannot serve as the image placeholder")
            self._placeholder_id = ids[0]
        return self._placeholder_id

    def check_placeholder(self, run_length):
        """Verify that the vocabulary encodes '@' * run_length as run_length placeholder ids.

        `encode` already guarantees this by splitting text at '@'; this checks the vocabulary
        itself, so a tokenizer whose BPE merges '@@' is reported rather than silently worked around.
        """
        pid = self.placeholder_id
        ids = self._tok.encode(self.placeholder * run_length, add_special_tokens=False).ids
        if ids != [pid] * run_length:
            raise ValueError(f"{self.source}: {self.placeholder!r} * {run_length} encodes to {len(ids)} ids, expected "
                             f"{run_length} copies of id {pid}: the vocabulary merges {self.placeholder!r}")

    def encode(self, text):
        """Text -> ids. Special-token strings map to their ids; no BOS/EOS is added.

        Text is split at runs of '@' and each '@' becomes exactly one placeholder id, whatever
        merges the vocabulary has (MiniMind's could merge ' @', which would shorten an image run
        by one and silently drop the image). A 3v tokenizer's placeholder is a special token: text is
        encoded as it is, as MiniMind-V's code does.
        """
        if self.template == "minimind-3v":
            return self._tok.encode(text, add_special_tokens=False).ids
        ids = []
        for piece in _AT_RUNS.split(text):
            if piece.startswith(PLACEHOLDER):
                ids.extend([self.placeholder_id] * len(piece))
            elif piece:
                ids.extend(self._tok.encode(piece, add_special_tokens=False).ids)
        return ids

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def train_bpe(texts, vocab_size=6400, template="minimind-v") -> "Tokenizer":
    """A byte-level BPE trained on an iterable of strings, with the three special tokens at ids 0, 1, 2
    (template "minimind-3v": 3v's 36 added tokens at ids 0-35, <|image_pad|> = 12).
    The texts should hold no '@': then BPE learns no merge with it and '@' stays one token forever."""
    hf = _HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS_3V if template == "minimind-3v" else SPECIAL_TOKENS,  # ids 0, 1, 2, ...
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    tok = Tokenizer(hf, source="trained tokenizer")
    tok.check_placeholder(196)
    return tok
