"""MiniMind-V datasets: one conversation (+ images) per sample -> tensors for training.

Two file formats, picked by extension (`parquet.open_dataset(path, ...)`):
  *.jsonl    one JSON object per line (this module), images in a folder beside it:
             {"conversations": [{"role": "user", "content": "<image>\\nWhat is this?"},
                                {"role": "assistant", "content": "A cat."}], "image": "cat.jpg"}
             with one `<image>` marker per image ("image": "a.jpg, b.jpg" for two, in order).
  *.parquet  MiniMind-V's current release: columns `conversations` (that list as a JSON string) and
             `image_bytes` (the encoded images); see `parquet.py`.

Each sample becomes

    input_ids     the ChatML-rendered conversation, every <image> expanded to run_length '@' ids
    labels        the same ids where the model is trained, -100 elsewhere (NOT shifted)
    pixel_values  FloatTensor[N_img, 3, S, S], CLIP-preprocessed, in marker order (N_img may be 0)

Every answer token, the `<|im_end|>` closing it and the "\\n" after that are trained, exactly as
MiniMind-V labels them (see `prompt.chat_pieces`). A sample longer than max_length is cut before the
first image run that does not fit (that image and everything after it are dropped), and a sample with
no answer token left is skipped quietly. Bad samples raise `DataError` naming the file and line (or
row); with `skip_bad=True` they are skipped. Every skip and cut is counted (`bad_summary()`), exactly
even with DataLoader workers (`SampleLog`).
"""

import json
import os
import re
from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset

from .processing import ImageLoadError, as_transform, load_image
from .prompt import IGNORE_INDEX, IMAGE_MARKER, encode_chat, unicode_problem


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
    """Nothing of the sample is left to train within max_length. Not an error: always skipped and
    counted, with or without skip_bad (MiniMind-V's long samples simply lose their tail)."""


ROLES = ("system", "user", "assistant")
TOOL_KEYS = ("tools", "tool_calls", "functions", "function_call")  # MiniMind's LLM data has them; a VLM does not


def check_conversations(conversations, n_images):
    """Raise DataError unless this is [system?] user, assistant, user, assistant, ... with
    string contents and exactly `n_images` `<image>` markers (none in answers)."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError("bad conversations", "'conversations' must be a non-empty list")
    start = 1 if isinstance(conversations[0], dict) and conversations[0].get("role") == "system" else 0
    for i, m in enumerate(conversations):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError("bad conversations", f"conversations[{i}] needs string 'role' and 'content' fields")
        if any(m.get(key) for key in TOOL_KEYS):
            raise DataError("tool calls", f"conversations[{i}] has {[k for k in TOOL_KEYS if m.get(k)]}: "
                                          f"tool and function calls are not supported")
        if m["role"] not in ROLES:
            raise DataError("unknown role", f"conversations[{i}] has role {m['role']!r} (expected one of {ROLES})")
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


# What fit_to_length did to a sample that was too long (recorded in SampleLog).
CUT, CUT_IMAGES = "cut", "cut, images dropped"


def fit_to_length(input_ids, labels, placeholder_id, run_length, max_length):
    """Cut (input_ids, labels) to max_length -> (input_ids, labels, what), `what` None, CUT or CUT_IMAGES.

    The cut goes before the first image run that does not end within max_length: an image whose run
    is partly cut would be silently ignored by the model (a known pitfall of the original), so that
    image and everything after it go (the caller keeps only the images whose runs remain). The tail
    after the last trained token is dropped too: it teaches nothing. SampleTooLong if no answer
    token is left.
    """
    if len(input_ids) <= max_length:
        return input_ids, labels, None
    cut, seen = max_length, 0
    for i, t in enumerate(input_ids[:max_length + 1]):
        if t == placeholder_id:
            if seen % run_length == 0 and i + run_length > max_length:  # run `seen // run_length` starts here
                cut = i
                break
            seen += 1
    trained = [i for i, label in enumerate(labels[:cut]) if label != IGNORE_INDEX]
    if not trained:
        raise SampleTooLong("too long", f"{len(input_ids)} tokens, no answer token left within max_length "
                                        f"{max_length}")
    end = trained[-1] + 1
    what = CUT_IMAGES if placeholder_id in input_ids[end:] else CUT
    return input_ids[:end], labels[:end], what


def encode_conversation(conversations, tokenizer, run_length, max_length):
    """Tokenize one conversation -> (input_ids, labels), two equally long lists of ints, by the same
    road inference takes (`prompt.encode_chat`), then cut to max_length (`fit_to_length`)."""
    input_ids, labels = encode_chat(tokenizer, conversations, run_length)
    return fit_to_length(input_ids, labels, tokenizer.placeholder_id, run_length, max_length)[:2]


def build_sample(conversations, images, tokenizer, run_length, max_length, image_size):
    """-> (sample dict, what fit_to_length did). `images` is a list of PIL images or of zero-argument
    functions returning one: images cut away by max_length are then never decoded."""
    check_conversations(conversations, len(images))
    input_ids, labels = encode_chat(tokenizer, conversations, run_length)
    input_ids, labels, what = fit_to_length(input_ids, labels, tokenizer.placeholder_id, run_length, max_length)
    kept = images[:input_ids.count(tokenizer.placeholder_id) // run_length]
    kept = [im() if callable(im) else im for im in kept]
    prep = as_transform(image_size)  # CLIP's crop, or SigLIP's squash (an ImageTransform)
    if kept:
        # A tensor is an image already encoded (features.py's cache): it passes through as it is.
        pixel_values = torch.stack([im if isinstance(im, torch.Tensor) else prep(im)
                                    for im in kept])  # (N, 3, S, S), or (N, 196, 768) cached features
    else:
        pixel_values = torch.zeros(0, 3, prep.size, prep.size)  # text-only sample
    sample = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),  # (T,)
        "labels": torch.tensor(labels, dtype=torch.long),  # (T,)
        "pixel_values": pixel_values,
    }
    return sample, what


def make_sample(conversations, images, tokenizer, run_length=196, max_length=640, image_size=224):
    """Conversations + already loaded PIL images -> one training sample (a dict of tensors).

    Shared by VLMDataset and by code that makes samples on the fly (e.g. synthetic data).
    """
    return build_sample(conversations, images, tokenizer, run_length, max_length, image_size)[0]


class SampleLog:
    """What happened to each sample of a dataset, one byte per sample in shared memory.

    DataLoader workers are separate processes: a Python dict filled in a worker never reaches the main
    process (so "skipped 0" was printed). A tensor moved to shared memory is the same memory in every
    worker, whether they are forked or spawned (torch's multiprocessing passes it by handle), so each
    process writes the bytes of the samples it loaded and the main process reads exact counts for any
    number of workers. A sample met again in a later epoch still counts once; 2.9M rows cost 2.9 MB.
    Byte 0 = fine (or not loaded yet); otherwise an index into NAMES, a fixed table (a name added in one
    worker could not reach the other processes); reasons not in it count as "other".
    """

    NAMES = ("", CUT, CUT_IMAGES, "too long", "invalid JSON", "bad conversations", "bad role order",
             "unknown role", "tool calls", "image count mismatch", "bad image field", "missing image",
             "unreadable image", "bad row", "other", "invalid text", "nested too deeply")

    def __init__(self, n):
        self.status = torch.zeros(n, dtype=torch.uint8).share_memory_()

    def mark(self, idx, name):
        names = self.NAMES
        self.status[idx] = names.index(name) if name in names else names.index("other")

    def counts(self) -> Counter:
        """name -> number of samples, names in order of their first sample."""
        codes = self.status.numpy()
        codes = codes[codes.nonzero()[0]]  # in sample order
        found, first, n = np.unique(codes, return_index=True, return_counts=True)
        order = np.argsort(first, kind="stable")
        return Counter({self.NAMES[int(found[k])]: int(n[k]) for k in order})


def summary_line(counts: Counter, n_samples: int, max_length: int) -> str:
    """e.g. 'skipped 3 bad samples of 1000 (2 missing image, 1 too long); cut 5 to max_length 640 (2 of them
    lost images)'. The skipped ones were replaced by other samples; the cut ones trained on what was left."""
    cut, cut_images = counts.pop(CUT, 0), counts.pop(CUT_IMAGES, 0)
    line = f"skipped {sum(counts.values())} bad samples of {n_samples}"
    if counts:
        line += " (" + ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) + ")"
    if cut or cut_images:
        line += f"; cut {cut + cut_images} to max_length {max_length}"
        line += f" ({cut_images} of them lost images)" if cut_images else ""
    return line


def data_summary(dataset):
    """The one-line summary of a VLMDataset or a ConcatDataset of them (several files); None for other
    datasets (synthetic data has nothing to skip)."""
    parts = getattr(dataset, "datasets", [dataset])
    parts = [d for d in parts if isinstance(d, VLMDataset)]
    if not parts:
        return None
    counts = sum((d.log.counts() for d in parts), Counter())
    return summary_line(counts, sum(len(d) for d in parts), parts[0].max_length)


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
    """A MiniMind-V jsonl file as a map-style dataset of `make_sample` dicts (a .parquet file is
    `parquet.ParquetVLMDataset`'s; `parquet.open_dataset` picks by extension).

    The file is indexed by byte offsets at construction (no JSON parsing, so 595K lines take about
    a second) and each line is parsed only when asked for. `image_loader(path) -> PIL.Image` can
    be replaced, e.g. to read images from somewhere else.
    """

    features = None  # a features.FileFeatures: cached vision features replace the images (train --features)

    def __init__(self, jsonl_path, *, tokenizer, images_dir=None, max_length=640, run_length=196,
                 image_size=224, skip_bad=False, image_loader=load_image):
        self.path = os.fspath(jsonl_path)
        if self.path.endswith(".parquet") and type(self) is VLMDataset:
            raise DataError(f"{self.path}: a parquet file; read it with ParquetVLMDataset "
                            f"(or parquet.open_dataset, which picks the reader by extension)")
        # images live beside the jsonl unless told otherwise
        self.images_dir = os.path.dirname(os.path.abspath(self.path)) if images_dir is None else os.fspath(images_dir)
        self.tokenizer, self.max_length, self.run_length = tokenizer, max_length, run_length
        self.image_size, self.skip_bad, self.image_loader = image_size, skip_bad, image_loader
        if tokenizer is not None:  # None: only the images are wanted (features.py)
            tokenizer.check_placeholder(run_length)
        offsets, line_numbers = [], []
        with open(self.path, "rb") as f:
            for line_no, offset, _ in jsonl_lines(f):
                offsets.append(offset)
                line_numbers.append(line_no)
        # numpy arrays, not lists: DataLoader workers share them instead of copying (reading a
        # Python int touches its refcount, which copies the memory page into every worker).
        self.offsets = np.array(offsets, dtype=np.int64)
        self.line_numbers = np.array(line_numbers, dtype=np.int64)
        self.log = SampleLog(len(self))  # why samples were skipped or cut, shared with the workers
        self.question_first = self._question_first()

    def _question_first(self):
        """Does this data ask its questions before the images? Read off the first sample, so that a
        checkpoint trained on it records how inference should place the images."""
        if not len(self):
            return False
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[0]))
            try:
                return asks_first(parse_json(f.readline())["conversations"])
            except (ValueError, KeyError, TypeError, StopIteration):  # DataError is a ValueError
                return False  # a bad first line is reported when it is loaded

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, idx):
        """Sample idx; a skipped one (too long, or bad under skip_bad) is replaced by the next good one,
        wrapping around, so the replacement is deterministic (exact resume depends on it)."""
        for k in range(len(self)):
            j = (idx + k) % len(self)
            try:
                sample, what = self._load(j)
            except DataError as e:
                if not (self.skip_bad or isinstance(e, SampleTooLong)):
                    raise
                self.log.mark(j, e.reason)
                continue
            if what:
                self.log.mark(j, what)
            return sample
        raise DataError("no good sample", f"{self.path}: every one of the {len(self)} samples is bad or too "
                                          f"long ({self.bad_summary()})")

    def _load(self, idx):
        """-> (sample, what fit_to_length did); DataError located at the file and line."""
        try:
            conversations, images = self.record(idx)
            return self._build(idx, conversations, images)
        except DataError as e:
            raise type(e)(e.reason, e.detail, where=f"{self.path}:{int(self.line_numbers[idx])}: ") from None

    def approx_lengths(self) -> np.ndarray:
        """Approximate tokens per sample for --group-by-length, without tokenizing: the line's bytes / 4
        (BPE averages a few bytes per token) + run_length per image marker, capped at max_length.
        Read once, on first use (one sequential pass over the file, ~1 s per 100 MB)."""
        if getattr(self, "_lengths", None) is None:
            marker, lengths = IMAGE_MARKER.encode(), np.empty(len(self), dtype=np.int64)
            with open(self.path, "rb") as f:
                for i, offset in enumerate(self.offsets):
                    f.seek(int(offset))
                    line = f.readline()
                    lengths[i] = len(line) // 4 + line.count(marker) * self.run_length
            self._lengths = np.minimum(lengths, self.max_length)
        return self._lengths

    def record(self, idx):
        """Sample idx, not tokenized -> (conversations, one zero-argument function per image that loads
        it): what `_load` builds a sample from, and what features.py encodes the images of."""
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[idx]))
            line = f.readline()
        record = parse_json(line)
        if not isinstance(record, dict) or "conversations" not in record:
            raise DataError("bad conversations", "no 'conversations' field")
        if any(record.get(key) for key in TOOL_KEYS):
            raise DataError("tool calls", "tool and function calls are not supported")
        names = _image_names(record.get("image"))
        return record["conversations"], [lambda name=name: self._load_image(name) for name in names]

    def _build(self, idx, conversations, images):
        """build_sample; with cached features (self.features) the images are never read: the sample
        holds "image_features" (N, 196, 768) instead of "pixel_values"."""
        if self.features is None:
            return build_sample(conversations, images, self.tokenizer, self.run_length, self.max_length,
                                self.image_size)
        images = self.features.images(idx, len(images))
        sample, what = build_sample(conversations, images, self.tokenizer, self.run_length, self.max_length,
                                    self.image_size)
        pixel_values = sample.pop("pixel_values")
        sample["image_features"] = pixel_values if len(pixel_values) else self.features.empty()
        return sample, what

    def _load_image(self, name):
        path = os.path.join(self.images_dir, name)
        try:
            return self.image_loader(path)
        except (ImageLoadError, OSError, ValueError) as e:
            reason = "unreadable image" if os.path.exists(path) else "missing image"
            raise DataError(reason, str(e)) from None

    def bad_summary(self):
        """One line, e.g. 'skipped 3 bad samples of 1000 (2 missing image, 1 invalid JSON)', plus
        '; cut 5 to max_length 640 (2 of them lost images)' when samples were cut. Exact with DataLoader workers."""
        return summary_line(self.log.counts(), len(self), self.max_length)


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark some Windows editors put at the start of a file
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # only JSON holding one can decode to a lone surrogate


def jsonl_lines(f):
    """(line number, byte offset, line bytes) of each non-blank line of a jsonl file opened in binary mode,
    as every reader (training, --eval, data stats/preview, tokenizer training) walks it. A BOM at the start
    of the file is skipped; anywhere else it is invalid JSON, as in any JSON text."""
    pos = 0
    for line_no, line in enumerate(f, 1):
        start = len(BOM) if line_no == 1 and line.startswith(BOM) else 0
        if line[start:].strip():
            yield line_no, pos + start, line[start:]
        pos += len(line)


def _strings(value):
    """Every string in a decoded JSON value (keys too), without recursion: the value may be deep."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        stack += [*v.keys(), *v.values()] if isinstance(v, dict) else v if isinstance(v, list) else []


def parse_json(text):
    """JSON text from outside (a jsonl line as bytes, a parquet cell) -> its value, or a DataError. The one
    parser of data files, so that every reader refuses the same: bytes that are not UTF-8, invalid JSON
    (json's own "line 1" would confuse inside a file of many), nesting too deep (json's RecursionError)
    and strings that are not valid Unicode ("\\ud800" decodes to a lone surrogate: `unicode_problem`)."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:  # decoded here, strictly: json.loads would guess UTF-16/32 and accept a BOM on any line
            text = bytes(text).decode("utf-8")  # (strict UTF-8 never decodes to a surrogate)
        except UnicodeDecodeError as e:
            raise DataError("invalid JSON", f"not UTF-8 ({e.reason} at byte {e.start})") from None
    elif problem := unicode_problem(text):  # a str made elsewhere, e.g. decoded with errors="surrogateescape"
        raise DataError("invalid text", problem)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError("invalid JSON", f"{e.msg} at character {e.pos}") from None
    except RecursionError:
        raise DataError("nested too deeply", "JSON nested too deeply to parse") from None
    if _SURROGATE_ESCAPE.search(text):  # else no decoded string can hold a surrogate
        for s in _strings(value):
            problem = unicode_problem(s)
            if problem:
                raise DataError("invalid text", f"{problem} of the string {s[:40]!r}")
    return value


def parse_conversations(stored):
    """A `conversations` value as stored: JSON text (a jsonl line's field is already decoded, but
    MiniMind-V's parquet column holds a JSON string) or an already decoded list, which passes through."""
    return parse_json(stored) if isinstance(stored, (str, bytes)) else stored


def asks_first(conversations):
    """True if the first user turn holds an image marker but does not start with one."""
    user = next(m["content"] for m in conversations if m["role"] == "user")
    return IMAGE_MARKER in user and not user.lstrip().startswith(IMAGE_MARKER)


def collate_vlm(batch, pad_id=0):
    """Stack samples into a batch, right-padding to the longest one.

    Returns a dict:
        input_ids       LongTensor (B, T_max), padded with pad_id
        labels          LongTensor (B, T_max), padded with -100 (never trained)
        attention_mask  LongTensor (B, T_max), 1 for real tokens, 0 for padding
        pixel_values    FloatTensor (B, N_max, 3, S, S), zero-padded; N_max may be 0
                        (or image_features (B, N_max, 196, 768) when the samples hold cached features)
        image_counts    LongTensor (B,), how many images of pixel_values[b] are real
    """
    B = len(batch)
    T = max(len(s["input_ids"]) for s in batch)
    key = "image_features" if "image_features" in batch[0] else "pixel_values"
    N = max(s[key].shape[0] for s in batch)
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
        key: torch.zeros(B, N, *batch[0][key].shape[1:]),
        "image_counts": torch.zeros(B, dtype=torch.long),
    }
    for b, s in enumerate(batch):
        t, n = len(s["input_ids"]), s[key].shape[0]
        out["input_ids"][b, :t] = s["input_ids"]
        out["labels"][b, :t] = s["labels"]
        out["attention_mask"][b, :t] = 1
        out[key][b, :n] = s[key]
        out["image_counts"][b] = n
    return out

