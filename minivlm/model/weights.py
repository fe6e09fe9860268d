"""Reading and writing weight files by hand: `.safetensors`, `.bin`/`.pth`, and strict key checks.

The safetensors format is simple enough to read in a few lines:

    [8 bytes: N, little-endian uint64][N bytes: JSON header][raw little-endian tensor bytes]

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets counted
from the first byte after the header; an optional "__metadata__" entry holds free-form strings.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import struct
import zipfile

import torch
import torch.nn as nn

from ..common import atomic_write, is_int, one_line

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


# What torch.load raises on a damaged or foreign file (corrupting files at random finds every one of
# these). Caught around torch.load calls only, so that a bug elsewhere still shows its traceback.
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError,
                     zipfile.BadZipFile)


class WeightsError(ValueError):
    """A weight file is unreadable or does not fit the model; the message names the file and keys."""


def read_safetensors(path, keys=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read tensors from a `.safetensors` file: all of them, or only `keys` (a collection of names or a
    predicate name -> bool), converted to `dtype` (floating-point tensors only) when given.

    Only the header and the byte ranges of the wanted tensors are read, one tensor at a time, straight
    into the tensor that keeps them (or, when converting, into one reused scratch buffer): loading the
    vision tower out of a full CLIP folder (571 MB, text tower included) reads its 343 MB and nothing
    else, and allocates nothing but the tensors it returns. (A fresh temporary per tensor would leave
    the heap fragmented: ~100 MB of freed-but-held memory was measured for ViT-B/16 in bf16.)
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header, body_start = _read_header(f, path, size)
        # The whole header is checked before a single tensor byte is read: a file that lies about one
        # tensor is refused as a whole, not half-loaded.
        entries = check_header(path, header, size - body_start)
        wanted = keys if keys is None or callable(keys) else set(keys).__contains__
        tensors, scratch = {}, torch.empty(0, dtype=torch.uint8)
        for name, (stored, shape, begin, end) in entries.items():
            if wanted is not None and not wanted(name):
                continue
            nbytes = end - begin
            f.seek(body_start + begin)
            convert = dtype is not None and stored.is_floating_point and stored != dtype
            if not convert:
                t = torch.empty(shape, dtype=stored)
                _read_into(f, t.reshape(-1).view(torch.uint8) if nbytes else t, path, name)
            else:
                if scratch.numel() < nbytes:
                    scratch = torch.empty(nbytes, dtype=torch.uint8)
                _read_into(f, scratch[:nbytes], path, name)
                t = scratch[:nbytes].view(stored).reshape(shape).to(dtype)
            tensors[name] = t
    return tensors


# A header is a few KB per tensor at most; anything past this is a damaged length field, and reading it
# whole would allocate whatever the 8 bytes claim.
MAX_HEADER_BYTES = 100 * 2**20


def _read_header(f, path, size):
    """-> (header dict, offset of the first tensor byte)."""
    if size < 8:
        raise WeightsError(f"{path}: too short to be a .safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", f.read(8))
    if 8 + n > size:
        raise WeightsError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
    if n > MAX_HEADER_BYTES:
        raise WeightsError(f"{path}: header length {n} is implausibly large (over {MAX_HEADER_BYTES} bytes)")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{path}: header is not valid JSON ({one_line(e)})") from None
    except RecursionError:  # `[[[[…` nested deeper than the JSON parser's stack
        raise WeightsError(f"{path}: header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: header is a JSON {type(header).__name__}, not an object of tensors")
    return header, 8 + n


def check_header(path, header: dict, body_len: int) -> dict:
    """Validate every entry of a safetensors header -> {name: (dtype, shape, begin, end)}, in file order.

    Each tensor: a known dtype, a shape of non-negative ints, data_offsets [begin, end] with
    0 <= begin <= end <= body_len and end - begin = numel * itemsize; no two tensors share a byte;
    `__metadata__`, if present, maps strings to strings. A WeightsError names the file and the tensor."""
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in info.items()):
                raise WeightsError(f"{path}: __metadata__ must map strings to strings, got {_short(info)}")
            continue
        entries[name] = _check_entry(path, name, info, body_len)
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise WeightsError(f"{path}: tensors {a!r} and {b!r} overlap (bytes {begin_b}..{end_a} belong to both)")
    return entries


def _short(x, n=60) -> str:
    text = repr(x)
    return text if len(text) <= n else text[:n] + "…"


def _check_entry(path, name, info, body_len):
    """One header entry -> (dtype, shape, begin, end), or a WeightsError if it cannot be read."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise WeightsError(f"{where}: header entry is {_short(info)}, not an object with dtype, shape, data_offsets")
    extra = set(info) - {"dtype", "shape", "data_offsets"}
    missing = {"dtype", "shape", "data_offsets"} - set(info)
    if missing or extra:
        raise WeightsError(f"{where}: header entry has {'missing ' + ', '.join(sorted(missing)) if missing else ''}"
                           f"{'; ' if missing and extra else ''}{'unknown ' + ', '.join(sorted(extra)) if extra else ''}")
    dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise WeightsError(f"{where} has unsupported dtype {_short(info['dtype'])}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(is_int(s) and s >= 0 for s in shape):
        raise WeightsError(f"{where}: shape {_short(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise WeightsError(f"{where}: data_offsets {_short(offsets)} is not a pair of integers [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= body_len:
        raise WeightsError(f"{where}: byte range [{begin}, {end}) is not inside the {body_len}-byte body")
    numel = 1
    for s in shape:
        numel *= s  # Python ints: a huge shape gives a huge number, not an overflow
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end - begin != numel * itemsize:
        raise WeightsError(f"{where} of shape {shape} does not fit its byte range "
                           f"[{begin}, {end}) ({end - begin} bytes, the shape needs {numel * itemsize})")
    return dtype, shape, begin, end


def _read_into(f, dest: torch.Tensor, path, name):
    """Fill the uint8 tensor `dest` from the file's current position."""
    if dest.numel() and f.readinto(memoryview(dest.numpy())) != dest.numel():
        raise WeightsError(f"{path}: tensor {name!r} ends early (file truncated while reading?)")


def write_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None):
    """Write tensors in the safetensors layout (atomically: a temporary file renamed into place)."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in _DTYPE_NAMES:
            raise WeightsError(f"{path}: cannot store tensor {name!r} of dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so tensor data starts 8-byte aligned
    atomic_write(path, [struct.pack("<Q", len(head)), head, *chunks])


def load_state_dict(path, keys=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A `.safetensors` file through our reader, anything else through torch.load(weights_only=True).
    keys / dtype: as in read_safetensors (only those tensors, converted to that floating-point dtype)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: weights file not found")
    if path.endswith(".safetensors"):
        return read_safetensors(path, keys, dtype)
    try:
        # mmap: tensors are read from the file when touched; those not wanted are never read.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except TORCH_LOAD_ERRORS as e:  # weights_only: a pickle that would run code is an UnpicklingError
        first = (str(e).strip().splitlines() or [""])[0]  # torch's own messages run over many lines
        raise WeightsError(f"{path}: cannot be read by torch.load ({type(e).__name__}: {first})") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # a training checkpoint that wraps the weights
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    if keys is not None:
        wanted = keys if callable(keys) else set(keys).__contains__
        sd = {k: v for k, v in sd.items() if wanted(k)}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def _is_zip(path) -> bool:
    """torch.save's zip format (since torch 1.6) can be memory-mapped; the legacy format cannot."""
    return zipfile.is_zipfile(path)


def check_state_dict(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], source: str):
    """Raise WeightsError naming every missing, unexpected or mis-shaped key (first few of each)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)} (model: {tuple(expected[k].shape)})"
              for k in expected if k in got and got[k].shape != expected[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f" … and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
    if problems:
        raise WeightsError(f"{source}: weights do not fit the model: " + "; ".join(problems))


@contextlib.contextmanager
def shapes_only():
    """Build modules for a file's tensors to fill (load_state_dict(assign=True)), with the initialisers
    switched off: each parameter is allocated but never written, and the OS backs a page with memory only
    when it is first written, so the replaced parameters never cost any.

    (The meta device does the same without relying on the OS, but its random initialisers and arange have
    no C++ kernels there: their first use imports torch's Python meta kernels, sympy included, ~75 MB of
    RSS for the rest of the process, more than a tenth of the 26m + ViT-B/16 weights.)"""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def load_checked(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str, assign: bool = False):
    """`module.load_state_dict` that names every missing / unexpected / mis-shaped key.

    Hugging Face CLIP files may hold `*.position_ids` buffers (just arange(77) / arange(197)); we
    compute positions, so those are dropped first. assign=True makes the given tensors the module's
    parameters (no copy): what a module built on the meta device needs.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    check_state_dict(module.state_dict(), sd, source)
    module.load_state_dict(sd, assign=assign)


def read_json(path) -> dict:
    """A JSON file of a weights folder or checkpoint (config.json, <name>.json) -> dict.
    A missing or malformed file is a WeightsError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: not found")
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
            raise WeightsError(f"{path}: invalid JSON ({one_line(e) or 'nested too deeply'})") from None
    if not isinstance(value, dict):  # every caller reads fields out of it
        raise WeightsError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value
