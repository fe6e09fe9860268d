"""Runtime plumbing shared by every command: devices and dtypes, autocast, memory, time, progress,
rank-0 printing and atomic file writes.

It lives in one place so that the model files never touch it and no command grows its own copy
(the same idea as nanochat's `common.py`).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import sys
import time

import torch



class UserError(Exception):
    """A mistake in what the user asked for (a missing file, a bad flag value, an unusable device).
    Commands print it as one line `error: ...` and exit with code 2; bugs keep their traceback."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size of 0 would otherwise loop forever or divide by 0)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)  # argparse turns this into "invalid positive_int value: '0'"
    return value


# The three compute dtypes a user can name on the command line.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Devices and dtypes


def resolve_device(name: str | None = None) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", …) or, when None, this process's GPU if there is one.

    Under torchrun each process takes the GPU of its LOCAL_RANK. On CUDA, TF32 matmuls are switched
    on: fp32 work then runs on the tensor cores with a 10-bit mantissa, which training tolerates.
    """
    if name is None:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (cpu, cuda, cuda:1, …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available (torch {torch.__version__} "
                        f"{'has no CUDA support' if torch.version.cuda is None else 'finds no GPU'}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def resolve_dtype(name: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on a GPU that supports it, else 'fp32'; other names pass through."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)} or auto")
    return name


def autocast(device: torch.device, dtype: str):
    """A context that runs matmuls in `dtype` ('bf16'/'fp16'); fp32 needs none."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def grad_scaler(device: torch.device, dtype: str) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 have the range and skip it."""
    return torch.amp.GradScaler(device.type, enabled=dtype == "fp16")


def sync(device: torch.device):
    """Wait for queued GPU work, so that a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """GPU: the most memory tensors held since the last reset. CPU: the process's peak resident set
    (ru_maxrss), a high-water mark that never goes down: it covers everything run so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # macOS: bytes, Linux: KiB


# ---------------------------------------------------------------------------------------------
# Printing


def is_main_process() -> bool:
    """True in a single process and in rank 0 of a torchrun job (torchrun sets RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs):
    """print() in the main process only, flushed, so that N processes do not log N times."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def is_int(x) -> bool:
    """An integer, as a field read from JSON must be: JSON's true would otherwise count as 1."""
    return isinstance(x, int) and not isinstance(x, bool)


def one_line(error: BaseException) -> str:
    """An error's message as one line. An exception raised in a DataLoader worker is re-raised in the
    main process with the worker's whole traceback as its message; its last line, "pkg.Type: text",
    holds the original message."""
    text = str(error).strip()
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def fmt_time(seconds: float) -> str:
    """Seconds -> 'h:mm:ss'."""
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Progress of a long job with rate and ETA: `what: done/total unit  rate unit/s  ETA h:mm:ss`.

    `update(done)` prints at most once per `every` seconds (and always at the end). On a terminal the
    line rewrites itself; in a log file each report is a line of its own. `start` is where a resumed
    job began, so its rate counts only the work done in this process.
    """

    def __init__(self, total: int, what: str, unit: str = "", stream=None, every: float = 1.0,
                 quiet: bool = False, start: int = 0):
        self.total, self.what, self.unit, self.start = total, what, unit, start
        self.stream = sys.stderr if stream is None else stream
        self.every, self.quiet = every, quiet
        self.t0 = self.last = time.time()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def rate(self, done: int) -> float:
        """Units per second since this object was made."""
        return (done - self.start) / max(time.time() - self.t0, 1e-9)

    def eta(self, done: int) -> float:
        """Seconds left at the rate so far."""
        return (self.total - done) / max(self.rate(done), 1e-9)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def update(self, done: int, note: str = ""):
        now = time.time()
        finished = done >= self.total
        if self.quiet or (now - self.last < self.every and not finished):
            return
        self.last = now
        unit = f" {self.unit}" if self.unit else ""
        line = (f"{self.what}: {done}/{self.total}{unit}  {self.rate(done):.1f}{unit}/s  "
                f"ETA {fmt_time(self.eta(done))}{note}")
        end = "\n" if finished or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


# ---------------------------------------------------------------------------------------------
# Files


def atomic_write(path, data):
    """Write `path` so that a crash leaves the old file or the new one, never half of one.

    `data` is bytes, a list of byte strings, or a function that writes into the open binary file
    (e.g. `lambda f: torch.save(obj, f)`). The bytes go to a temporary file beside `path`, are
    flushed to disk, and the file is renamed over `path`; the temporary file is removed on failure.
    An OSError (a full disk, no permission) is raised again naming `path`, not the temporary file:
    that is the file the user asked for, and `write_error` turns it into their one-line message.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                for chunk in ([data] if isinstance(data, (bytes, bytearray)) else data):
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # A write's error (open, write, fsync, rename of the temporary file): named by `path`. An error
        # that names another file (an input `data` was reading) keeps its name.
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, tmp):
            raise OSError(e.errno, e.strerror, path) from None  # errno picks the subclass (PermissionError, …)
        raise


def atomic_copy(src, dst):
    """Copy the file `src` to `dst` through atomic_write (a crash leaves the old `dst` or the new one)."""
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def atomic_link(src, dst):
    """Make `dst` the file `src` in one rename: a hard link when the file system has them (no copy of a
    big checkpoint, no second copy on disk), else an atomic_copy. `src` itself is never touched."""
    tmp = f"{os.fspath(dst)}.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (FAT, some network file systems): copy instead
        atomic_copy(src, dst)
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_error(error: OSError, path=None) -> str:
    """An OSError as the one line a command prints: the file, then the system's reason
    ('out/v.parquet: No space left on device'), without errno numbers or temporary names."""
    name = error.filename if error.filename is not None else path
    reason = error.strerror or one_line(error) or type(error).__name__
    return f"{name}: {reason}" if name is not None else reason
