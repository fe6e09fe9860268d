"""Look at a MiniMind-V data file before training on it (`python -m minivlm.data stats|preview|repack FILE`),
and train a tokenizer on data files (`python -m minivlm.tokenizer train --data FILE... --out DIR`).

    stats FILE      rows, images per row, the text-only share, and token lengths (percentiles, and how many
                    samples --max-length would cut) over the first --limit rows
    preview FILE    the first images of the file in a grid (--out grid.png) and the first answer of each row
    repack FILE     a parquet file rewritten in row groups of --rows rows (fast random access while training)

Works on jsonl and parquet files. Only the conversations are read for the counts (a pass over a
multi-GB parquet file reads its text column, not its images); token lengths need --tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

from ..common import positive_int, write_error
from .dataset import DataError, jsonl_lines, parse_conversations
from .parquet import decode_image, image_list, iter_rows, repack
from .processing import ImageLoadError, load_image, save_image
from .prompt import DEFAULT_SYSTEM_PROMPT, IMAGE_MARKER, TEMPLATES, chat_prompt, encode_chat
from .tokenizer import PLACEHOLDER, Tokenizer, train_bpe


def _parse(text, where, strict):
    """parse_conversations (training's parser: the same rules), or None for a malformed value (stats count
    it instead of stopping); with strict, a DataError naming `where`."""
    try:
        return parse_conversations(text)
    except DataError as e:
        if strict:
            raise DataError(e.reason, e.detail, where=f"{where}: ") from None
        return None


def records(path, with_images=False, strict=False):
    """(where, conversations, images) for every sample; images are byte strings or file paths;
    conversations None where the JSON does not parse (with strict: a DataError naming file and line)."""
    path = os.fspath(path)
    if path.endswith(".parquet"):
        columns = ["conversations", "image_bytes"] if with_images else ["conversations"]
        for row, record in iter_rows(path, columns=columns):
            c = record["conversations"]
            images = image_list(record.get("image_bytes")) if with_images else []
            yield f"{path}: row {row}", _parse(c, f"{path}: row {row}", strict), images
        return
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        for line_no, _, line in jsonl_lines(f):  # as training reads it (a BOM on line 1 is skipped)
            record = _parse(line, f"{path}:{line_no}", strict)
            record = record if isinstance(record, dict) else {}
            image = record.get("image") if isinstance(record.get("image"), str) else ""
            names = [n.strip() for n in image.split(",") if n.strip()]
            yield f"{path}:{line_no}", record.get("conversations"), [os.path.join(folder, n) for n in names]


def stats(path, tokenizer=None, run_length=196, max_length=640, limit=2000) -> str:
    """A few lines describing the file (see the module docstring)."""
    images_per_row, lengths, malformed = [], [], 0
    for _, conversations, _ in records(path):
        try:
            images_per_row.append(sum(m["content"].count(IMAGE_MARKER) for m in conversations))
            if tokenizer is not None and len(lengths) < limit:
                lengths.append(len(encode_chat(tokenizer, conversations, run_length)[0]))
        except (KeyError, TypeError, AttributeError):
            malformed += 1  # training reports these one by one; here they are only counted
    n = len(images_per_row)
    counts = np.bincount(images_per_row) if n else np.zeros(1, dtype=int)
    lines = [f"{path}: {n} rows" + (f" (+ {malformed} malformed)" if malformed else ""),
             "images per row: " + (", ".join(f"{k}: {c} ({c / n:.1%})" for k, c in enumerate(counts) if c) or "-"),
             f"text-only rows: {counts[0]} ({counts[0] / max(n, 1):.1%})"]
    if lengths:
        p = np.percentile(lengths, [50, 90, 99])
        over = sum(t > max_length for t in lengths)
        lines.append(f"tokens (first {len(lengths)} rows, {run_length} per image): median {p[0]:.0f}, "
                     f"90% {p[1]:.0f}, 99% {p[2]:.0f}, max {max(lengths)}; {over} ({over / len(lengths):.1%}) "
                     f"longer than --max-length {max_length}")
    return "\n".join(lines)


def preview(path, out, n=16, cols=4, size=128, pad=4):
    """Write the first image of each of the first n rows in a grid; returns one line per tile."""
    rows = -(-n // cols)
    grid = Image.new("RGB", (cols * (size + pad) + pad, rows * (size + pad) + pad), (90, 90, 90))
    notes = []
    for k, (where, conversations, images) in enumerate(records(path, with_images=True)):
        if k == n:
            break
        if not isinstance(conversations, list) or not all(isinstance(m, dict) for m in conversations):
            notes.append(f"{k + 1:2d}. [malformed] {where}")
            continue
        answer = next((m["content"] for m in conversations if m["role"] == "assistant"), "")
        marked = any(IMAGE_MARKER in m["content"] for m in conversations)
        kind = f"{len(images)} image(s)" if marked else "text only"
        if marked and images:
            try:  # decoded as training decodes it: the same pixel limit, the same refusals
                im = decode_image(images[0], 0) if isinstance(images[0], bytes) else load_image(images[0])
            except (ImageLoadError, DataError) as e:
                notes.append(f"{k + 1:2d}. [unreadable image] {where}: {e}")
                continue
            r, c = divmod(k, cols)
            grid.paste(im.resize((size, size)), (pad + c * (size + pad), pad + r * (size + pad)))
        notes.append(f"{k + 1:2d}. [{kind}] {where}: {answer[:80]!r}")
    save_image(grid, out)
    return notes


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minivlm.data", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stats", help="rows, images per row, text-only share, token lengths")
    s.add_argument("file")
    s.add_argument("--tokenizer", help="tokenizer.json or its folder: also count tokens")
    s.add_argument("--run-length", type=int, default=196, help="placeholder tokens per image")
    s.add_argument("--max-length", type=int, default=640, help="the training --max-length to compare with")
    s.add_argument("--limit", type=int, default=2000, help="rows whose tokens are counted (from the start)")
    r = sub.add_parser("repack", help="rewrite a parquet file in small row groups, for fast random access")
    r.add_argument("file")
    r.add_argument("--out", required=True, help="the parquet file to write")
    r.add_argument("--rows", type=positive_int, default=256, help="rows per row group")
    v = sub.add_parser("preview", help="the first images in a grid, and their answers")
    v.add_argument("file")
    v.add_argument("--out", required=True, help="PNG file to write")
    v.add_argument("-n", type=int, default=16, help="rows to show")
    args = p.parse_args(argv)
    try:
        if args.command == "stats":
            tok = None
            if args.tokenizer:
                tok = Tokenizer.from_file(args.tokenizer)
            print(stats(args.file, tok, args.run_length, args.max_length, args.limit))
        elif args.command == "repack":
            print(f"wrote {args.out}: {repack(args.file, args.out, args.rows)} rows in groups of {args.rows}")
        else:
            print(f"wrote {args.out}:\n" + "\n".join(preview(args.file, args.out, args.n)))
    except OSError as e:  # e.g. a full disk while writing --out: the file and the reason, on one line
        print(f"error: {write_error(e)}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------
# Training a tokenizer on data files


def training_texts(files):
    """The text of every message in MiniMind-V jsonl or parquet files, one string per message, without
    image markers and '@' (so that '@' stays one token), plus the default system prompt."""
    for path in files:
        for where, conversations, _ in records(path, strict=True):  # bad JSON or text: a located DataError
            try:
                texts = [f"{m['role']}\n{m['content']}" for m in conversations]
            except (KeyError, TypeError) as e:
                raise DataError(f"{where}: not a MiniMind-V sample ({type(e).__name__}: {e})") from None
            for text in texts:
                yield text.replace(IMAGE_MARKER, "").replace(PLACEHOLDER, "")
        yield f"system\n{DEFAULT_SYSTEM_PROMPT}"  # the default system prompt is in every sample


def train_tokenizer(files, vocab_size=6400, out_dir=None, template="minimind-v") -> Tokenizer:
    """Train a byte-level BPE on MiniMind-V jsonl or parquet files; returns a `Tokenizer` (saved if out_dir).
    template "minimind-3v" gives it minimind-3v's 36 added tokens (placeholder <|image_pad|>, id 12).

    A small corpus may support fewer merges than asked for: check `.vocab_size` afterwards.
    """
    tok = train_bpe(training_texts(files), vocab_size, template)
    if out_dir is not None:
        tok.save(out_dir)
        tok.source = os.path.join(out_dir, "tokenizer.json")
    return tok


def tokenizer_main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minivlm.tokenizer",
                                     description="Train a byte-level BPE tokenizer for minivlm.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE tokenizer on MiniMind-V jsonl or parquet files")
    train.add_argument("--data", nargs="+", required=True, metavar="JSONL",
                       help="one or more MiniMind-V jsonl or parquet files; the text of every message is used")
    train.add_argument("--vocab-size", type=int, default=6400,
                       help="target vocabulary size incl. 3 special tokens and 256 bytes (default 6400)")
    train.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.json into")
    train.add_argument("--template", choices=TEMPLATES, default="minimind-v",
                       help="the model generation it is for: minimind-v (placeholder '@', 3 special tokens) or "
                            "minimind-3v (36 added tokens, placeholder <|image_pad|>, for --preset 3v)")
    args = parser.parse_args(argv)
    try:
        tok = train_tokenizer(args.data, vocab_size=args.vocab_size, out_dir=args.out, template=args.template)
    except (OSError, ValueError) as e:  # a missing or bad data file (DataError is a ValueError), an unwritable --out
        # (a full disk: the old tokenizer.json stays whole, see Tokenizer.save)
        print(f"error: {write_error(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(args.out, 'tokenizer.json')}: vocab size {tok.vocab_size} "
          f"(asked for {args.vocab_size})")
    ids = chat_prompt(tok, [{"role": "user", "content": "What is in <image>?"}], run_length=4)
    print(f"sample: {tok.decode(ids, skip_special_tokens=False)!r}\n  -> {len(ids)} ids: {ids}")
    return 0
