"""MiniMind-V jsonl datasets: one conversation (+ images) per line -> tensors for training.

A line looks like
    {"conversations": [{"role": "user", "content": "<image>\\nWhat is this?"},
                       {"role": "assistant", "content": "A cat."}], "image": "cat.jpg"}
with one `<image>` marker per image ("image": "a.jpg, b.jpg" for two, in order) and the images in
a folder beside the jsonl. Each sample becomes

    input_ids     the ChatML-rendered conversation, every <image> expanded to run_length '@' ids
    labels        the same ids where the model is trained, -100 elsewhere (NOT shifted)
    pixel_values  FloatTensor[N_img, 3, S, S], CLIP-preprocessed, in marker order

Only assistant answers and the `<|im_end|>` closing each of them are trained (see
`prompt.chat_pieces`). Bad lines raise `DataError` naming `path:line:`; with `skip_bad=True`
the dataset skips them and counts why (`bad_summary()`).
"""

import json
import os
from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset

from .processing import ImageLoadError, load_image, preprocess_image
from .prompt import IGNORE_INDEX, IMAGE_MARKER, encode_chat


class DataError(ValueError):
    """A sample that cannot be used. `reason` is a short category used for counting.

    Also constructible from one message string: that is how torch re-raises an exception that
    happened in a DataLoader worker (the message then carries the worker's traceback).
    """

    def __init__(self, reason, detail=None, where=""):
        if detail is None:  # DataError(message)
            reason, detail, message = "bad sample", reason, reason
        else:
            message = f"{where}{reason}: {detail}"
        self.reason, self.detail = reason, detail
        super().__init__(message)


class SampleTooLong(DataError):
    """The sample does not fit in max_length without cutting an image or losing every answer."""


def check_conversations(conversations, n_images):
    """Raise DataError unless this is [system?] user, assistant, user, assistant, ... with
    string contents and exactly `n_images` `<image>` markers (none in answers)."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError("bad conversations", "'conversations' must be a non-empty list")
    start = 1 if isinstance(conversations[0], dict) and conversations[0].get("role") == "system" else 0
    for i, m in enumerate(conversations):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError("bad conversations", f"conversations[{i}] needs string 'role' and 'content' fields")
        expected = "system" if i < start else ("user", "assistant")[(i - start) % 2]
        if m["role"] != expected:
            raise DataError("bad role order", f"conversations[{i}] has role {m['role']!r}, expected {expected!r}")
        if m["role"] == "assistant" and IMAGE_MARKER in m["content"]:
            raise DataError("bad conversations", f"conversations[{i}]: {IMAGE_MARKER} in an assistant answer")
    if conversations[-1]["role"] != "assistant":
        raise DataError("bad role order", "the last message must be an assistant answer")
    markers = sum(m["content"].count(IMAGE_MARKER) for m in conversations)
    if markers != n_images:
        raise DataError("image count mismatch", f"{markers} {IMAGE_MARKER} marker(s) but {n_images} image(s)")


def encode_conversation(conversations, tokenizer, run_length, max_length):
    """Tokenize one conversation -> (input_ids, labels), two equally long lists of ints, by the same
    road inference takes (`prompt.encode_chat`), then cut to max_length without cutting an image."""
    input_ids, labels = encode_chat(tokenizer, conversations, run_length)
    if len(input_ids) <= max_length:
        return input_ids, labels

    # Too long: cut the tail, but only after the last placeholder run: an image whose run is
    # partly cut would be silently ignored by the model (a known pitfall of the original).
    pid = tokenizer.placeholder_id
    last_run_end = max((i + 1 for i, t in enumerate(input_ids) if t == pid), default=0)
    if last_run_end > max_length:
        raise SampleTooLong("too long", f"{len(input_ids)} tokens and an image run ends at token "
                                        f"{last_run_end} > max_length {max_length}")
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        raise SampleTooLong("too long", f"no answer token left within max_length {max_length}")
    return input_ids, labels


def make_sample(conversations, images, tokenizer, run_length=196, max_length=640, image_size=224):
    """Conversations + already loaded PIL images -> one training sample (a dict of tensors).

    Shared by VLMDataset and by code that makes samples on the fly (e.g. synthetic data).
    """
    check_conversations(conversations, len(images))
    input_ids, labels = encode_conversation(conversations, tokenizer, run_length, max_length)
    if images:
        pixel_values = torch.stack([preprocess_image(im, image_size) for im in images])  # (N, 3, S, S)
    else:
        pixel_values = torch.zeros(0, 3, image_size, image_size)  # text-only sample
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),  # (T,)
        "labels": torch.tensor(labels, dtype=torch.long),  # (T,)
        "pixel_values": pixel_values,
    }


def _image_names(field):
    """The "image" field -> list of file names ("a.jpg, b.jpg" -> ["a.jpg", "b.jpg"])."""
    if field is None or field == "":
        return []
    if isinstance(field, str):
        return [name.strip() for name in field.split(",")]
    if isinstance(field, list) and all(isinstance(name, str) for name in field):
        return [name.strip() for name in field]
    raise DataError("bad image field", f"'image' must be a string, got {type(field).__name__}")


class VLMDataset(Dataset):
    """A MiniMind-V jsonl file as a map-style dataset of `make_sample` dicts.

    The file is indexed by byte offsets at construction (no JSON parsing, so 595K lines take about
    a second) and each line is parsed only when asked for. `image_loader(path) -> PIL.Image` can
    be replaced, e.g. to read images from somewhere else.
    """

    def __init__(self, jsonl_path, *, tokenizer, images_dir=None, max_length=640, run_length=196,
                 image_size=224, skip_bad=False, image_loader=load_image):
        self.path = os.fspath(jsonl_path)
        # images live beside the jsonl unless told otherwise
        self.images_dir = os.path.dirname(os.path.abspath(self.path)) if images_dir is None else os.fspath(images_dir)
        self.tokenizer, self.max_length, self.run_length = tokenizer, max_length, run_length
        self.image_size, self.skip_bad, self.image_loader = image_size, skip_bad, image_loader
        tokenizer.check_placeholder(run_length)
        offsets, line_numbers, pos = [], [], 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    offsets.append(pos)
                    line_numbers.append(line_no)
                pos += len(line)
        # numpy arrays, not lists: DataLoader workers share them instead of copying (reading a
        # Python int touches its refcount, which copies the memory page into every worker).
        self.offsets = np.array(offsets, dtype=np.int64)
        self.line_numbers = np.array(line_numbers, dtype=np.int64)
        self.bad = {}  # line number -> reason, for the samples skipped so far (in this process)
        self.question_first = self._question_first()

    def _question_first(self):
        """Does this data ask its questions before the images? Read off the first sample, so that a
        checkpoint trained on it records how inference should place the images."""
        if not len(self):
            return False
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[0]))
            try:
                user = json.loads(f.readline())["conversations"]
                user = next(m["content"] for m in user if m["role"] == "user")
            except (ValueError, KeyError, TypeError, StopIteration):
                return False  # a bad first line is reported when it is loaded
        return IMAGE_MARKER in user and not user.lstrip().startswith(IMAGE_MARKER)

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, idx):
        if not self.skip_bad:
            return self._load(idx)
        for k in range(len(self)):  # deterministic: the next good sample, wrapping around
            j = (idx + k) % len(self)
            try:
                return self._load(j)
            except DataError as e:
                self.bad[int(self.line_numbers[j])] = e.reason
        raise DataError("no good sample", f"{self.path}: every one of the {len(self)} samples is bad")

    def _load(self, idx):
        line_no = int(self.line_numbers[idx])
        try:
            with open(self.path, "rb") as f:
                f.seek(int(self.offsets[idx]))
                line = f.readline()
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:  # json's own "line 1" would be confusing here
                raise DataError("invalid JSON", f"{e.msg} at character {e.pos}") from None
            except UnicodeDecodeError as e:
                raise DataError("invalid JSON", f"not UTF-8 ({e.reason} at byte {e.start})") from None
            if not isinstance(record, dict) or "conversations" not in record:
                raise DataError("bad conversations", "no 'conversations' field")
            names = _image_names(record.get("image"))
            check_conversations(record["conversations"], len(names))  # before the costly image loads
            images = [self._load_image(name) for name in names]
            return make_sample(record["conversations"], images, self.tokenizer, self.run_length,
                               self.max_length, self.image_size)
        except DataError as e:
            raise type(e)(e.reason, e.detail, where=f"{self.path}:{line_no}: ") from None

    def _load_image(self, name):
        path = os.path.join(self.images_dir, name)
        try:
            return self.image_loader(path)
        except (ImageLoadError, OSError, ValueError) as e:
            reason = "unreadable image" if os.path.exists(path) else "missing image"
            raise DataError(reason, str(e)) from None

    def bad_summary(self):
        """One line, e.g. 'skipped 3 bad samples of 1000 (2 missing image, 1 invalid JSON)'."""
        line = f"skipped {len(self.bad)} bad samples of {len(self)}"
        if self.bad:
            counts = Counter(self.bad.values()).most_common()
            line += " (" + ", ".join(f"{n} {reason}" for reason, n in counts) + ")"
        return line


def collate_vlm(batch, pad_id=0):
    """Stack samples into a batch, right-padding to the longest one.

    Returns a dict:
        input_ids       LongTensor (B, T_max), padded with pad_id
        labels          LongTensor (B, T_max), padded with -100 (never trained)
        attention_mask  LongTensor (B, T_max), 1 for real tokens, 0 for padding
        pixel_values    FloatTensor (B, N_max, 3, S, S), zero-padded; N_max may be 0
        image_counts    LongTensor (B,), how many images of pixel_values[b] are real
    """
    B = len(batch)
    T = max(len(s["input_ids"]) for s in batch)
    N = max(s["pixel_values"].shape[0] for s in batch)
    C, S = batch[0]["pixel_values"].shape[1], batch[0]["pixel_values"].shape[-1]
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
        "pixel_values": torch.zeros(B, N, C, S, S),
        "image_counts": torch.zeros(B, dtype=torch.long),
    }
    for b, s in enumerate(batch):
        t, n = len(s["input_ids"]), s["pixel_values"].shape[0]
        out["input_ids"][b, :t] = s["input_ids"]
        out["labels"][b, :t] = s["labels"]
        out["attention_mask"][b, :t] = 1
        out["pixel_values"][b, :n] = s["pixel_values"]
        out["image_counts"][b] = n
    return out
