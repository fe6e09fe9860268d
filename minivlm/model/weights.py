"""Reading and writing weight files by hand: `.safetensors`, `.bin`/`.pth`, and strict key checks.

The safetensors format is simple enough to read in a few lines:

    [8 bytes: N, little-endian uint64][N bytes: JSON header][raw little-endian tensor bytes]

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets counted
from the first byte after the header; an optional "__metadata__" entry holds free-form strings.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile

import torch

from ..common import atomic_write

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
        wanted = keys if keys is None or callable(keys) else set(keys).__contains__
        tensors, scratch = {}, torch.empty(0, dtype=torch.uint8)
        for name, info in header.items():
            if name == "__metadata__" or (wanted is not None and not wanted(name)):
                continue
            stored, shape, nbytes = _check_entry(path, name, info, size - body_start)
            f.seek(body_start + info["data_offsets"][0])
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


def _read_header(f, path, size):
    """-> (header dict, offset of the first tensor byte)."""
    if size < 8:
        raise WeightsError(f"{path}: too short to be a .safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", f.read(8))
    if 8 + n > size:
        raise WeightsError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: header is not valid JSON ({e})") from None
    return header, 8 + n


def _check_entry(path, name, info, body_len):
    """One header entry -> (dtype, shape, byte count), or a WeightsError if it cannot be read."""
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    shape, (begin, end) = info["shape"], info["data_offsets"]
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end - begin != numel * itemsize or end > body_len:
        raise WeightsError(f"{path}: tensor {name!r} of shape {shape} does not fit its byte range "
                           f"[{begin}, {end}) in a {body_len}-byte body")
    return dtype, shape, end - begin


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
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path}: invalid JSON ({e})") from None
