"""The tokenizer: byte-level BPE with ChatML's special tokens and a one-token image placeholder.

`Tokenizer` wraps a `tokenizers.Tokenizer` (MiniMind's `minimind_tokenizer/tokenizer.json`, or one
trained here with `train_tokenizer`). Ids 0/1/2 are `<|endoftext|>` (pad), `<|im_start|>` (bos) and
`<|im_end|>` (eos). Every '@' encodes to exactly one placeholder id (34 in MiniMind's vocabulary): a run
of 196 of them stands for one image, and the VLM later finds these runs by id and overwrites their
embeddings with the image features. How a conversation becomes text and ids is `prompt.py`'s job.

Training a tokenizer:  python -m minivlm.tokenizer train --data A.jsonl --vocab-size 6400 --out DIR
"""

import argparse
import json
import os
import re

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # trained tokenizers get ids 0, 1, 2
PLACEHOLDER = "@"  # one placeholder id per image feature

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
    """Byte-level BPE tokenizer with the three ChatML special tokens and a one-token '@'."""

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
        self._placeholder_id = None  # looked up lazily, see placeholder_id

    @classmethod
    def from_file(cls, path):
        """Load `tokenizer.json`, or a folder holding one (like MiniMind's `minimind_tokenizer/`)."""
        hf, file = read_tokenizer_json(path)
        return cls(hf, source=file)

    def save(self, folder):
        os.makedirs(folder, exist_ok=True)
        self._tok.save(os.path.join(folder, "tokenizer.json"))

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def placeholder_id(self):
        """Id of the single token '@' that fills image placeholder runs."""
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
        ids = self._tok.encode(PLACEHOLDER * run_length, add_special_tokens=False).ids
        if ids != [pid] * run_length:
            raise ValueError(f"{self.source}: '@' * {run_length} encodes to {len(ids)} ids, expected "
                             f"{run_length} copies of id {pid}: the vocabulary merges '@'")

    def encode(self, text):
        """Text -> ids. Special-token strings map to their ids; no BOS/EOS is added.

        Text is split at runs of '@' and each '@' becomes exactly one placeholder id, whatever
        merges the vocabulary has (MiniMind's could merge ' @', which would shorten an image run
        by one and silently drop the image).
        """
        ids = []
        for piece in _AT_RUNS.split(text):
            if piece.startswith(PLACEHOLDER):
                ids.extend([self.placeholder_id] * len(piece))
            elif piece:
                ids.extend(self._tok.encode(piece, add_special_tokens=False).ids)
        return ids

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


# ---------------------------------------------------------------------------------------------
# Training


def _samples(path):
    """(where, parse) for every sample of a MiniMind-V jsonl or parquet file; parse() returns its
    conversations (and raises on a malformed one, which the caller reports at `where`)."""
    if os.fspath(path).endswith(".parquet"):
        from .dataset import parse_conversations  # data.py builds on this module
        from .parquet import iter_rows  # pyarrow only when needed
        for row, record in iter_rows(path, columns=["conversations"]):
            c = record["conversations"]
            yield f"{path}: row {row}", lambda c=c: parse_conversations(c)
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{line_no}", lambda line=line: json.loads(line)["conversations"]


def _training_texts(files):
    """Stream the text of every message in MiniMind-V jsonl or parquet files, one string per message."""
    from .prompt import DEFAULT_SYSTEM_PROMPT, IMAGE_MARKER  # prompt.py builds on this module
    for path in files:
        for where, parse in _samples(path):
            try:
                texts = [f"{m['role']}\n{m['content']}" for m in parse()]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{where}: not a MiniMind-V sample ({e})") from None
            # Strip the image markers (they are not text) and every '@': with no '@' in the
            # corpus, BPE never learns a merge involving it, so '@' stays one token forever.
            for t in texts:
                yield t.replace(IMAGE_MARKER, "").replace(PLACEHOLDER, "")
        yield f"system\n{DEFAULT_SYSTEM_PROMPT}"  # the default system prompt is in every sample


def train_tokenizer(files, vocab_size=6400, out_dir=None):
    """Train a byte-level BPE on MiniMind-V jsonl or parquet files; returns a `Tokenizer` (saved if out_dir).

    A small corpus may support fewer merges than asked for: check `.vocab_size` afterwards.
    """
    hf = _HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # listed first, so they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    hf.train_from_iterator(_training_texts(files), trainer=trainer)
    tok = Tokenizer(hf, source="trained tokenizer")
    tok.check_placeholder(196)
    if out_dir is not None:
        tok.save(out_dir)
        tok.source = os.path.join(out_dir, "tokenizer.json")
    return tok


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minivlm.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE tokenizer on MiniMind-V jsonl or parquet files")
    train.add_argument("--data", nargs="+", required=True, metavar="JSONL",
                       help="one or more MiniMind-V jsonl or parquet files; the text of every message is used")
    train.add_argument("--vocab-size", type=int, default=6400,
                       help="target vocabulary size incl. 3 special tokens and 256 bytes (default 6400)")
    train.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.json into")
    args = parser.parse_args(argv)

    from .prompt import chat_prompt  # prompt.py builds on this module

    tok = train_tokenizer(args.data, vocab_size=args.vocab_size, out_dir=args.out)
    print(f"wrote {os.path.join(args.out, 'tokenizer.json')}: vocab size {tok.vocab_size} "
          f"(asked for {args.vocab_size})")
    ids = chat_prompt(tok, [{"role": "user", "content": "What is in <image>?"}], run_length=4)
    print(f"sample: {tok.decode(ids, skip_special_tokens=False)!r}\n  -> {len(ids)} ids: {ids}")


if __name__ == "__main__":
    main()
