"""Checking what a client sends to `python -m minivlm.web`: the JSON body, the sampling knobs, an uploaded file.

Everything a client can get wrong ends here as an `HTTPError` (a 4xx status and a one-line message), so the
server never answers a mistake with a 500 and a traceback.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from itertools import accumulate

from ..infer.generate import SamplingConfig

MAX_BODY_BYTES = 20 * 1024 * 1024  # a request body (an uploaded image travels base64-encoded in JSON)
# The largest image file the page may upload: base64 makes it 4/3 larger, and the JSON around it (the
# name, the keys) needs room too, so 15 MB of file is what fits a 20 MiB body, not 20 MB. The page reads
# this number from /api/info, so page and server check the same limit.
MAX_UPLOAD_BYTES = 15_000_000
assert MAX_UPLOAD_BYTES * 4 // 3 + 64 * 1024 <= MAX_BODY_BYTES
MAX_NEW_TOKENS = 256  # the most tokens one answer may ask for
MAX_JSON_DEPTH = 32  # nesting of the body: the API needs 4; json.loads recurses and dies near 1000


class HTTPError(Exception):
    """A request the server refuses: answered with `status`, {"error": message} and any extra `headers`."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n % 1_000_000 else f"{n // 1_000_000} MB"


def shown(value, limit: int = 60) -> str:
    """A client's value for an error message: short, and never a crash (a 400-digit number, a deep list)."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    text = json.dumps(value) if isinstance(value, (str, bool, float)) or value is None else str(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included (unrolled: fast on 20 MB)
NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def depth_ok(text: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests at most `limit` brackets deep, counted before json.loads recurses into it
    (10 KB of '[' is a RecursionError there). Brackets inside strings do not count."""
    if text.count(b"[") + text.count(b"{") <= limit:  # every body the page sends: no need to look closer
        return True
    marks = STRING.sub(b"", text).translate(None, NOT_BRACKETS)
    return max(accumulate(1 if c in b"[{" else -1 for c in marks), default=0) <= limit


def lone_surrogate(obj, where: str = "") -> str | None:
    """Where a string holds half a UTF-16 pair ("messages[0].text"): JSON may spell one ("\\ud800"), and Python
    then holds a str that no encoder accepts (the tokenizer, a log line). None when every string is valid
    Unicode. The recursion is safe: depth_ok has bounded the nesting."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the body"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        if isinstance(key, str) and lone_surrogate(key):
            return f"a key in {where or 'the body'}"
        found = lone_surrogate(value, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key)
        if found:
            return found
    return None


def parse_body(raw: bytes) -> dict:
    """A request body -> its JSON object, or HTTPError 400 saying what is wrong with it."""
    if not depth_ok(raw):
        raise HTTPError(400, f"the body nests JSON more than {MAX_JSON_DEPTH} levels deep")
    try:
        req = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise HTTPError(400, "the body must be a JSON object")
    where = lone_surrogate(req)
    if where:
        raise HTTPError(400, f"{where[:100]} holds a lone UTF-16 surrogate (such as \\ud800): text must be valid Unicode")
    return req


def upload_bytes(data: str, name: str) -> bytes:
    """{"data": base64 or a data URL} -> the file's bytes (at most MAX_UPLOAD_BYTES)."""
    if data.startswith("data:"):
        head, comma, data = data.partition(",")
        if not comma and head == "data:":  # what a browser reads an empty file as
            raise HTTPError(400, f"{name} is an empty file")
        if not comma:
            raise HTTPError(400, f"{name}: a data URL needs a comma before its data ('data:image/png;base64,...')")
        if not head.endswith(";base64"):
            raise HTTPError(400, f"{name}: the data URL must be base64 ('data:...;base64,...')")
    if len(data) * 3 // 4 > MAX_UPLOAD_BYTES + 2:  # before decoding: no need to hold a copy to know
        raise HTTPError(413, f"{name} is {megabytes(len(data) * 3 // 4)}; the limit is {megabytes(MAX_UPLOAD_BYTES)}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, f"{name}: data is not valid base64") from None
    if len(raw) > MAX_UPLOAD_BYTES:
        raise HTTPError(413, f"{name} is {megabytes(len(raw))}; the limit is {megabytes(MAX_UPLOAD_BYTES)}")
    return raw


def number(value, name: str, lo, hi, integer: bool = False):
    """A JSON number within [lo, hi], or HTTPError 400 naming the field. The range check alone also refuses
    NaN and infinity, and compares a 400-digit integer exactly (math.isfinite would overflow on it)."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise HTTPError(400, f"sampling.{name} must be {kind} from {lo} to {hi}, got {shown(value)}")
    return value


def parse_sampling(raw, vocab_size: int) -> SamplingConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise HTTPError(400, "sampling must be a JSON object")
    known = {"temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise HTTPError(400, f"unknown sampling field(s) {shown(', '.join(unknown))}; known: {', '.join(sorted(known))}")
    cfg = SamplingConfig(max_new_tokens=64, seed=0)
    for name, lo, hi, integer in (("temperature", 0.0, 5.0, False), ("top_p", 0.01, 1.0, False),
                                  ("top_k", 0, vocab_size, True), ("repetition_penalty", 1.0, 5.0, False),
                                  ("max_new_tokens", 1, MAX_NEW_TOKENS, True)):
        if name in raw:
            setattr(cfg, name, number(raw[name], name, lo, hi, integer))
    if raw.get("seed") is not None:
        cfg.seed = number(raw["seed"], "seed", 0, 2**31 - 1, integer=True)
    return cfg
