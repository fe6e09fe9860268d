"""Look at a MiniMind-V data file before training on it: `python -m minivlm.data stats|preview FILE`.

    stats FILE      rows, images per row, the text-only share, and token lengths (percentiles, and how many
                    samples --max-length would cut) over the first --limit rows
    preview FILE    the first images of the file in a grid (--out grid.png) and the first answer of each row
    repack FILE     a parquet file rewritten in row groups of --rows rows (fast random access while training)

Works on jsonl and parquet files. Only the conversations are read for the counts (a pass over a
multi-GB parquet file reads its text column, not its images); token lengths need --tokenizer.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
from PIL import Image

from .dataset import DataError, parse_conversations
from .prompt import IMAGE_MARKER, encode_chat


def _parse(text):
    """parse_conversations, or None for a malformed value (stats count it instead of stopping)."""
    try:
        return parse_conversations(text)
    except DataError:
        return None


def records(path, with_images=False):
    """(where, conversations, images) for every sample; images are PIL-openable byte strings or file paths;
    conversations None where the JSON does not parse."""
    path = os.fspath(path)
    if path.endswith(".parquet"):
        from .parquet import iter_rows, image_list
        columns = ["conversations", "image_bytes"] if with_images else ["conversations"]
        for row, record in iter_rows(path, columns=columns):
            c = record["conversations"]
            images = image_list(record.get("image_bytes")) if with_images else []
            yield f"{path}: row {row}", _parse(c), images
        return
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                record = _parse(line)
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
        if marked and images:
            source = io.BytesIO(images[0]) if isinstance(images[0], bytes) else images[0]
            with Image.open(source) as im:
                tile = im.convert("RGB").resize((size, size))
            r, c = divmod(k, cols)
            grid.paste(tile, (pad + c * (size + pad), pad + r * (size + pad)))
        kind = f"{len(images)} image(s)" if marked else "text only"
        notes.append(f"{k + 1:2d}. [{kind}] {where}: {answer[:80]!r}")
    grid.save(out)
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
    r.add_argument("--rows", type=int, default=256, help="rows per row group")
    v = sub.add_parser("preview", help="the first images in a grid, and their answers")
    v.add_argument("file")
    v.add_argument("--out", required=True, help="PNG file to write")
    v.add_argument("-n", type=int, default=16, help="rows to show")
    args = p.parse_args(argv)
    try:
        if args.command == "stats":
            tok = None
            if args.tokenizer:
                from .tokenizer import Tokenizer
                tok = Tokenizer.from_file(args.tokenizer)
            print(stats(args.file, tok, args.run_length, args.max_length, args.limit))
        elif args.command == "repack":
            from .parquet import repack
            print(f"wrote {args.out}: {repack(args.file, args.out, args.rows)} rows in groups of {args.rows}")
        else:
            print(f"wrote {args.out}:\n" + "\n".join(preview(args.file, args.out, args.n)))
    except (OSError, ValueError, KeyError, TypeError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
