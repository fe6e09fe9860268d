"""What a training run leaves in --out and how it continues: the paths, the checkpoint + resume state
(`save`), the checks on --resume (`restore`), the CSV log, and stopping on Ctrl-C / SIGTERM.

The resume state (`resume_{stage}.pt`) holds only tensors, numbers, strings, lists and dicts, so it
is read with `torch.load(weights_only=True)`: a file from elsewhere cannot run code. The RNG states are
stored as their plain parts (Python's Mersenne Twister words, numpy's key array, torch's byte tensor).

On --resume the flags that decide which samples come in which order and how many steps there are
must be the ones the run started with; a changed one is refused, naming it (old -> new). Other flags
(learning rate, logging, …) may change, at the user's risk.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import pickle
import random
import re
import signal
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..model.checkpoint import save_vlm
from ..common import UserError, atomic_copy, atomic_write, is_main_process, print0, write_error
from ..model.weights import TORCH_LOAD_ERRORS

# steps: how many steps the row's loss averages (--log-every, fewer in the first row after a --resume
# that restored between two rows: the mean of exactly the steps since the resume, labelled so).
CSV_FIELDS = ["epoch", "step", "steps", "total_steps", "loss", "lr", "samples_per_s", "tokens_per_s",
              "elapsed_s", "eta_s", "peak_mem_mb", "attn_on_target"]

# The flags that fix the data order and the step count (plus the process count, recorded as "world").
RESUME_FLAGS = ("preset", "data", "images", "batch_size", "grad_accum", "epochs", "max_steps", "seed",
                "max_length", "world", "group_by_length", "untied_embeddings")  # + every shapes-world option


# ---------------------------------------------------------------------------------------------
# The output folder: paths, checkpoint + resume state, log


def checkpoint_name(out, stage, cfg) -> str:
    return os.path.join(out, f"{stage}_vlm_{cfg.lm.hidden_size}{'_moe' if cfg.lm.use_moe else ''}.pth")


@dataclass
class Paths:
    """What a stage writes in --out."""
    out: str
    ckpt: str  # the MiniMind-V style checkpoint
    resume: str  # model + optimizer + RNG state for --resume
    csv: str  # the log, one row per --log-every steps

    @classmethod
    def of(cls, out, stage, cfg) -> "Paths":
        return cls(out, checkpoint_name(out, stage, cfg), os.path.join(out, f"resume_{stage}.pt"),
                   os.path.join(out, f"log_{stage}.csv"))


def check_out(out):
    """The output folder exists (or is made) and is writable, before any work is done."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or type(e).__name__})") from None


def prepare_out(cfg, paths: Paths, step: int):
    """Make the output folder self-contained (a copy of the tokenizer) and start the CSV log (on resume,
    keep the rows up to `step`: later ones are redone)."""
    remove_stale_tmp(paths.out)
    tok_file = os.path.join(cfg.tokenizer, "tokenizer.json") if os.path.isdir(cfg.tokenizer) else cfg.tokenizer
    tok_copy = os.path.join(paths.out, "tokenizer.json")
    with writing(tok_copy):
        if not (os.path.exists(tok_copy) and os.path.samefile(tok_file, tok_copy)):
            atomic_copy(tok_file, tok_copy)
    with writing(paths.csv):
        if not cfg.resume or not os.path.isfile(paths.csv):
            atomic_write(paths.csv, csv_text([]))
        else:
            trim_csv(paths.csv, step)


@dataclass
class Saver:
    """Everything `save` needs besides the model and the step."""
    stage: str
    cfg: object  # the run's TrainConfig
    paths: Paths
    world: int
    q_first: bool
    vocab: int  # the tokenizer's size, recorded so a foreign tokenizer is caught at load time


def save(sv: Saver, model, optimizer, scaler, step, final=False):
    """The checkpoint (the vision tower when it was trained, the .pth, then the JSON that vouches for both
    by step and sha256), then the resume state. Called in every process: each one's RNG state is
    gathered (dropout draws differ between processes), then rank 0 writes."""
    rngs = all_rng_states(sv.world)
    if is_main_process():
        write_save(sv, model, optimizer, scaler, step, rngs, final)
    if sv.world > 1:
        dist.barrier()  # the other processes wait for the files: nobody runs ahead of the save


def write_save(sv: Saver, model, optimizer, scaler, step, rngs, final):
    """The checkpoint as one unit (save_vlm: a kill anywhere leaves the previous save or this one), then
    the resume state (one atomic file). A kill between the two leaves a resume state one save behind the
    checkpoint: --resume redoes those steps, bit for bit, and saves them again."""
    # A trained tower must travel with the checkpoint.
    vision_dir = os.path.join(sv.paths.out, f"{sv.stage}_vision") if sv.cfg.train_vision else None
    with writing(sv.paths.ckpt):
        save_vlm(model, sv.paths.ckpt, vision_folder=vision_dir, question_first=sv.q_first, step=step,
                 tokenizer_vocab_size=sv.vocab)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "step": step, "rng": rngs, "args": {**sv.cfg.record(), "world": sv.world}}
    with writing(sv.paths.resume):
        atomic_write(sv.paths.resume, lambda f: torch.save(state, f))
    print0(f"saved {sv.paths.ckpt}" + (" (final)" if final else f" at step {step}"))


@contextlib.contextmanager
def writing(path):
    """An OSError while writing (a full disk, no permission) ends the run as one line naming the file and
    the system's reason, e.g. `error: out/resume_sft.pt: No space left on device`; atomic writes leave
    the old file whole."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {write_error(e, path)}") from None


def csv_text(rows: list[dict]) -> bytes:
    """The log with the current header and `rows` (dicts; a field a row lacks stays empty)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def append_log(path, row: dict):
    """Add one row to the CSV log in one write. A write that fails (a full disk) is cut back off, so the
    log never keeps half a row; appending, not rewriting, keeps each row's cost independent of the log's
    length (a long run logs thousands of rows)."""
    text = io.StringIO(newline="")
    csv.DictWriter(text, CSV_FIELDS).writerow(row)
    with writing(path), open(path, "ab") as f:
        size = f.tell()
        try:
            f.write(text.getvalue().encode())
            f.flush()
        except OSError:
            with contextlib.suppress(OSError):
                f.truncate(size)
            raise


def trim_csv(path, step: int):
    """Drop log rows past `step`: they came from steps the resumed run is about to redo. A log of an
    older version (other columns) is rewritten with the current header, so new rows line up."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames
    if not header or "step" not in header:
        return
    keep = [r for r in rows if (r.get("step") or "").isdigit() and int(r["step"]) <= step]
    if len(keep) != len(rows) or header != CSV_FIELDS:
        atomic_write(path, csv_text(keep))


_TMP = re.compile(r"\.tmp(\d+)$")


def remove_stale_tmp(folder):
    """Remove `*.tmp<pid>` files that an earlier, killed run left (common.atomic_write's temporaries),
    in `folder` and its subfolders one level down. Files of a process that still runs are kept."""
    if not os.path.isdir(folder):
        return
    dirs = [folder] + [os.path.join(folder, d) for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))]
    for d in dirs:
        for name in os.listdir(d):
            m = _TMP.search(name)
            path = os.path.join(d, name)
            if m and os.path.isfile(path) and not pid_alive(int(m.group(1))):
                os.remove(path)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from before: nothing of this process is writing yet
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return False
    except PermissionError:
        return True  # someone else's process
    return True


# ---------------------------------------------------------------------------------------------
# RNG states as plain data


def rng_state() -> dict:
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def all_rng_states(world: int) -> list[dict]:
    """Every process's RNG state, in rank order (a collective call under torchrun)."""
    if world == 1:
        return [rng_state()]
    # Through byte tensors (torch.save + weights_only load), the way every other collective here works.
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    mine = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([mine.numel()]))
    longest = int(max(s.item() for s in sizes))
    padded = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(padded, torch.cat([mine, mine.new_zeros(longest - mine.numel())]))
    return [torch.load(io.BytesIO(p[:int(s.item())].numpy().tobytes()), weights_only=True) for p, s in zip(padded, sizes)]


def set_rng_state(state: dict):
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Reading and checking the resume state


def load_resume(path) -> dict:
    """The resume state at `path`; a missing, truncated or foreign file is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: --resume but there is no resume state (was the run started with this --out?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refuses anything but plain data: a crafted pickle ends here
        raise UserError(f"{path}: not a readable resume state (it holds objects other than tensors and plain "
                        f"data, which are never unpickled; so do resume states of older minivlm versions)") from None
    except TORCH_LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable resume state ({type(e).__name__}: {first[:200]})") from None
    keys = {"model", "optimizer", "scaler", "step", "rng", "args"}
    if not isinstance(state, dict) or not keys <= set(state) or not isinstance(state["args"], dict):
        raise UserError(f"{path}: not a minivlm resume state (expected the keys {', '.join(sorted(keys))})")
    return state


def changed_flags(saved: dict, cfg, world: int) -> list[str]:
    """'--flag old -> new' for every flag of RESUME_FLAGS (and of the shapes world) that differs from the saved run."""
    now = {**cfg.record(), "world": world}

    def norm(k, v):  # a path given relative one time and absolute the next is the same path
        if k not in ("data", "images") or v is None:
            return v
        paths = [v] if isinstance(v, str) else list(v)
        return [p if p == "synthetic" else os.path.abspath(p) for p in paths]

    changed = []
    for k in RESUME_FLAGS + tuple(cfg.shapes):
        if k in saved and norm(k, saved[k]) != norm(k, now.get(k)):
            name = "processes (WORLD_SIZE)" if k == "world" else "--" + k.replace("_", "-")
            changed.append(f"{name} {saved[k]} -> {now.get(k)}")
    return changed


def check_resume_args(path, saved: dict, cfg, world: int):
    changed = changed_flags(saved, cfg, world)
    if changed:
        raise UserError(f"{path}: --resume with different settings than the run it continues: "
                        f"{'; '.join(changed)} (they decide the data order and step count; use the old "
                        f"values, or a new --out)")


def restore(resume_path, cfg, world: int, model, optimizer, scaler) -> int:
    """Load the resume state into model, optimizer, scaler and the RNGs; returns the step reached."""
    state = load_resume(resume_path)
    check_resume_args(resume_path, state["args"], cfg, world)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]  # one per process (a single dict in resume states of early versions)
        set_rng_state(rngs[int(os.environ.get("RANK", "0"))] if isinstance(rngs, list) else rngs)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # what load_state_dict & co raise on a misfit
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{resume_path}: does not fit this model and run ({first[:200]})") from None
    return int(state["step"])


# ---------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM


class StopRequest:
    """Turns SIGINT / SIGTERM into a request to stop at the next step boundary, so the loop can save a
    resume point instead of dying mid-write. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.previous = {}

    def handler(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self.previous[s] = signal.signal(s, self.handler)
            except ValueError:  # not the main thread (e.g. called from a notebook worker): no handler
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)
        return False

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def stop_requested(stop: StopRequest, world: int, device) -> bool:
    """Whether a signal asked to stop; under DDP, whether any process got one (all stop at the same step)."""
    if world == 1:
        return stop.signum is not None
    flag = torch.tensor([0 if stop.signum is None else stop.signum], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop.signum = int(flag.item()) or None
    return stop.signum is not None


def ignore_signals(worker_id):
    """DataLoader workers leave Ctrl-C to the main process, which stops at a step boundary (a terminal
    sends Ctrl-C to every process of the job; a worker dying of it would end the run). SIGTERM keeps its
    default: it is what shuts the workers down when the main process exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
