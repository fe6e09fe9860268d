"""MiniMind-V's parquet datasets (the format of its releases since 2025-12), read lazily.

One row per sample, two columns:

    conversations  a JSON string: [{"role": "user", "content": "<image>\\nWhat is this?"},
                                   {"role": "assistant", "content": "A cat."}]   (a system turn may come first)
    image_bytes    the encoded image (JPEG/PNG bytes), or a list of them for several images, in marker order

A row without any `<image>` marker is a text-only conversation: its image (MiniMind-V stores an 8x8 black
placeholder there) is dropped, and the sample trains the decoder alone. Today's files are several GB, so
nothing is read whole:

  * construction reads the footer only (the row count of each row group), no data;
  * a sample reads its row group (the two columns, still encoded) and keeps that one row group cached:
    neighbouring rows then cost nothing, and memory stays at one row group per process, whatever the
    file size;
  * the open file is not pickled: each DataLoader worker opens the file itself (also after a fork,
    where sharing the parent's handle would be unsafe).

Shuffled access reads a row group per sample. Row groups of MiniMind-V's files hold a few hundred to a
few thousand rows; a sampler that shuffles row groups and then the rows inside each (`grouped_order`)
reads each row group once per epoch instead.

pyarrow is imported here only, so jsonl users do not need it.
"""

from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..common import atomic_write
from . import processing
from .dataset import TOOL_KEYS, DataError, SampleLog, VLMDataset, asks_first, parse_conversations
from .prompt import IMAGE_MARKER

COLUMNS = ("conversations", "image_bytes")
# Random access reads a whole row group per sample: ~3 ms for 256 rows of 20 KB images, ~35 ms for 1024,
# ~0.5 s for 4096 (measured on a 2-core CPU). Beyond this many rows, construction warns and says how to
# repack the file (`python -m minivlm.data repack`).
MAX_GROUP_ROWS = 1024


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit("error: reading .parquet data needs pyarrow (pip install 'pyarrow>=14')") from None
    return pa, pq


def arrow_summary(error: BaseException, limit: int = 200) -> str:
    """pyarrow's message as one printable line. Its messages run over several lines (and may quote raw
    bytes): an error raised in a DataLoader worker reaches the main process as a traceback whose last
    line is all that is shown, which was then just ")"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = "; ".join(lines) or type(error).__name__
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return f"{type(error).__name__}: {text[:limit]}" + ("…" if len(text) > limit else "")


def open_parquet(path):
    """pyarrow.parquet.ParquetFile(path), or a DataError naming the file (missing, truncated, not parquet)."""
    pa, pq = _pyarrow()
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError("not a parquet file", f"cannot read it as parquet ({detail})", where=f"{path}: ") from None


def image_list(value):
    """The image_bytes cell -> a list of byte strings (None -> [])."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [bytes(value)]
    if isinstance(value, dict) and "bytes" in value:  # Hugging Face datasets' Image feature: {"bytes", "path"}
        return image_list(value["bytes"])
    if isinstance(value, (list, tuple)):
        return [b for item in value for b in image_list(item)]
    raise DataError("bad image field", f"image_bytes holds a {type(value).__name__}, not bytes")


def decode_image(data: bytes, k: int) -> Image.Image:
    """Encoded bytes -> an RGB PIL image, decoded fully now (as `processing.load_image` does for files)."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            limit = getattr(processing, "MAX_IMAGE_PIXELS", None)
            if limit and im.width * im.height > limit:
                raise DataError("unreadable image", f"image {k}: {im.width * im.height:,} pixels is more than "
                                                    f"MAX_IMAGE_PIXELS = {limit:,}")
            im.load()  # truncated bytes fail here, not later
            return processing.to_rgb(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError("unreadable image", f"image {k} ({len(data)} bytes): not a readable image "
                                            f"({type(e).__name__})") from None


def count_markers(conversations):
    """How many `<image>` markers the turns hold (0 for malformed turns: checked later, with a clear error)."""
    if not isinstance(conversations, list):
        return 0
    return sum(m["content"].count(IMAGE_MARKER) for m in conversations
               if isinstance(m, dict) and isinstance(m.get("content"), str))


def grouped_order(group_sizes, generator=None):
    """A shuffled order of all rows that reads each row group once: the row groups in random order,
    the rows of each in random order. `generator`: a numpy Generator (seeded for reproducibility)."""
    rng = generator if generator is not None else np.random.default_rng()
    starts = np.concatenate([[0], np.cumsum(group_sizes)[:-1]]).astype(np.int64)
    order = [starts[g] + rng.permutation(group_sizes[g]) for g in rng.permutation(len(group_sizes))]
    return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)


class ParquetVLMDataset(VLMDataset):
    """A MiniMind-V parquet file as a map-style dataset of `data.make_sample` dicts.

    Same arguments and behaviour as the jsonl `VLMDataset` (skip_bad, quiet skipping of samples with
    nothing to train, `bad_summary()`); errors name the file and the 0-based row.
    """

    def __init__(self, path, *, tokenizer, max_length=640, run_length=196, image_size=224, skip_bad=False,
                 images_dir=None, image_loader=None):
        self.path = os.fspath(path)
        if images_dir is not None or image_loader is not None:
            raise ValueError(f"{self.path}: a parquet file holds its own images (no images_dir / image_loader)")
        self.tokenizer, self.max_length, self.run_length = tokenizer, max_length, run_length
        self.image_size, self.skip_bad = image_size, skip_bad
        if tokenizer is not None:  # None: only the images are wanted (features.py)
            tokenizer.check_placeholder(run_length)
        pf = open_parquet(self.path)  # the footer only
        missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise DataError("bad columns", f"no column {missing[0]!r}: MiniMind-V's parquet has columns "
                                           f"{list(COLUMNS)}, this file {pf.schema_arrow.names}",
                            where=f"{self.path}: ")
        md = pf.metadata
        self.group_sizes = np.array([md.row_group(g).num_rows for g in range(md.num_row_groups)], dtype=np.int64)
        self.group_starts = np.concatenate([[0], np.cumsum(self.group_sizes)]).astype(np.int64)  # (groups + 1,)
        if len(self.group_sizes) and self.group_sizes.max() > MAX_GROUP_ROWS:
            warnings.warn(f"{self.path}: row groups of up to {self.group_sizes.max():,} rows: each sample will read "
                          f"(and cache) a whole row group. Repack once for fast random access: python -m "
                          f"minivlm.data repack {self.path} --out SMALL_GROUPS.parquet", stacklevel=2)
        self.log = SampleLog(len(self))
        self._file = self._pid = self._cached = None  # opened (and filled) lazily, in each process
        self._question_first = None

    def __len__(self):
        return int(self.group_starts[-1])

    def __getstate__(self):
        """What a spawned DataLoader worker gets: no open file, no cached row group (it opens its own)."""
        state = self.__dict__.copy()
        state["_file"] = state["_pid"] = state["_cached"] = None
        return state

    def _row_group(self, g):
        """Row group g as a pyarrow Table of the two columns; the last one read stays cached."""
        if self._pid != os.getpid():  # first use in this process (or a forked copy of the parent's)
            self._file, self._pid, self._cached = open_parquet(self.path), os.getpid(), None
        if self._cached is None or self._cached[0] != g:
            self._cached = None  # free the old group before reading the new one
            self._cached = (g, self._file.read_row_group(g, columns=list(COLUMNS)))
        return self._cached[1]

    def row(self, idx):
        """Row idx -> (conversations as stored, image_bytes cell), undecoded."""
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        g = int(np.searchsorted(self.group_starts, idx, side="right")) - 1
        pa, _ = _pyarrow()
        try:
            table = self._row_group(g)
            r = idx - int(self.group_starts[g])
            return table.column(COLUMNS[0])[r].as_py(), table.column(COLUMNS[1])[r].as_py()
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # damaged data, the footer fine
            raise DataError("bad row", f"row group {g} is unreadable ({arrow_summary(e)})") from None

    def _load(self, idx):
        """-> (sample, what fit_to_length did); DataError located at the file and row."""
        try:
            return self._build(idx, *self.record(idx))
        except DataError as e:
            raise type(e)(e.reason, e.detail, where=f"{self.path}: row {idx}: ") from None

    def approx_lengths(self) -> np.ndarray:
        """As VLMDataset.approx_lengths, from the conversations column alone (images are not read)."""
        if getattr(self, "_lengths", None) is None:
            lengths = []
            for _, row in iter_rows(self.path, columns=[COLUMNS[0]], batch_size=4096):  # damage: a DataError
                text = row[COLUMNS[0]]
                text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
                n_bytes = len(text.encode("utf-8", "replace"))
                lengths.append(n_bytes // 4 + text.count(IMAGE_MARKER) * self.run_length)
            self._lengths = np.minimum(np.array(lengths, dtype=np.int64), self.max_length)
        return self._lengths

    def record(self, idx):
        """Row idx -> (conversations, one zero-argument function per image that decodes it)."""
        stored, cell = self.row(idx)
        conversations = parse_conversations(stored)
        if isinstance(conversations, dict) and any(conversations.get(k) for k in TOOL_KEYS):
            raise DataError("tool calls", "tool and function calls are not supported")
        # text-only: the image stored anyway (MiniMind-V's 8x8 black placeholder) is dropped undecoded
        blobs = image_list(cell) if count_markers(conversations) else []
        return conversations, [lambda b=b, k=k: decode_image(b, k) for k, b in enumerate(blobs)]  # decoded if kept

    @property
    def question_first(self):
        """Read off the first row on first use: its conversations column only, no images, nothing cached."""
        if self._question_first is None:
            self._question_first = False
            pa, _ = _pyarrow()
            try:
                first = next(open_parquet(self.path).iter_batches(batch_size=1, columns=[COLUMNS[0]]), None)
                if first is not None and first.num_rows:
                    stored = first.column(0)[0].as_py()
                    self._question_first = asks_first(parse_conversations(stored))
            except (DataError, pa.ArrowException, OSError, KeyError, TypeError, StopIteration):
                pass  # a bad first row is reported when it is loaded
        return self._question_first


def write_parquet(path, rows, row_group_size=1024):
    """Write [(conversations list, [image bytes, ...]), ...] in MiniMind-V's schema. `image_bytes` is a plain
    binary column when every row has exactly one image (as in MiniMind-V's files), else a list of binaries."""
    pa, pq = _pyarrow()
    single = all(len(images) == 1 for _, images in rows)
    images = [im[0] for _, im in rows] if single else [list(im) for _, im in rows]
    table = pa.table({COLUMNS[0]: pa.array([json.dumps(c, ensure_ascii=False) for c, _ in rows], pa.string()),
                      COLUMNS[1]: pa.array(images, pa.binary() if single else pa.list_(pa.binary()))})
    atomic_write(path, lambda f: pq.write_table(table, f, row_group_size=row_group_size))


def iter_rows(path, columns=COLUMNS, batch_size=256):
    """(row number, {column: value}) for every row in order, a batch at a time: for a pass over the whole
    file (tokenizer training, statistics), where reading only the columns needed is what saves time."""
    pa, _ = _pyarrow()
    path = os.fspath(path)
    pf, i = open_parquet(path), 0
    batches = pf.iter_batches(batch_size=batch_size, columns=list(columns))
    while True:
        try:
            batch = next(batches, None)
            rows = [] if batch is None else batch.to_pylist()
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # damaged data, the footer fine
            raise DataError("bad row", f"rows from {i} on are unreadable ({arrow_summary(e)})",
                            where=f"{path}: ") from None
        if batch is None:
            return
        for row in rows:
            yield i, row
            i += 1


def repack(path, out, rows=256):
    """Copy a parquet file with row groups of `rows` rows, streaming it a batch at a time (pyarrow may still
    hold one row group of the input in memory: do it once, on a machine that can). The copy goes to a
    temporary file renamed over `out` at the end: a failed run leaves an existing `out` as it was. `out`
    may not be the input itself (writing it would empty the file being read)."""
    if rows < 1:
        raise ValueError(f"rows per group must be at least 1, got {rows}")
    path, out = os.fspath(path), os.fspath(out)
    if os.path.exists(out) and os.path.exists(path) and os.path.samefile(path, out):
        raise ValueError(f"--out {out}: is the input file {path}; write the copy elsewhere (then rename it)")
    pa, pq = _pyarrow()
    pf = open_parquet(path)
    n = 0

    def write(f):
        nonlocal n
        with pq.ParquetWriter(f, pf.schema_arrow) as writer:
            for batch in pf.iter_batches(batch_size=rows):
                writer.write_table(pa.Table.from_batches([batch]), row_group_size=rows)
                n += batch.num_rows

    atomic_write(out, write)
    return n


def open_dataset(path, **kwargs) -> VLMDataset:
    """A MiniMind-V data file as a dataset, by its extension: .parquet (images inside) or jsonl (images in
    a folder, `images_dir`)."""
    if os.fspath(path).endswith(".parquet"):
        return ParquetVLMDataset(path, **kwargs)
    return VLMDataset(path, **kwargs)
