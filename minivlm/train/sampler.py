"""Which samples each step sees: a seeded, resumable epoch order shared by every process, optionally
in batches of similar length (LLaVA's length grouping)."""

import numpy as np
import torch
from torch.utils.data import Sampler

from ..common import UserError
from ..data.parquet import grouped_order


class EpochSampler(Sampler):
    """Shuffle with seed + epoch (identical on every rank), give rank r the indices r, r+W, r+2W, …
    (as DistributedSampler does), and optionally start `start` indices into the epoch — which is what
    an exact resume needs.

    With `group_sizes` (a parquet file's row groups) the shuffle is `parquet.grouped_order`: row groups
    in random order, rows shuffled within each, so a row group is read once per epoch and not once per
    sample (reading a row group costs milliseconds to a second). Length grouping then stays inside each
    row group, so this still holds."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, group_sizes=None, lengths=None,
                 batch_size: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.group_sizes = group_sizes
        self.lengths, self.batch_size = lengths, batch_size  # lengths: --group-by-length
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def indices(self):
        if self.group_sizes is not None:
            perm = torch.from_numpy(grouped_order(self.group_sizes, np.random.default_rng(self.seed + self.epoch)))
        else:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        if self.lengths is not None:
            chunks = None if self.group_sizes is None else group_runs(perm, self.group_sizes)
            perm = length_grouped(perm, self.lengths, self.batch_size * self.world, self.seed + self.epoch, chunks)
        per_rank = self.n // self.world  # equal shares, so all ranks take the same number of steps
        return perm[self.rank:per_rank * self.world:self.world][self.start:].tolist()

    def __iter__(self):
        return iter(self.indices())

    def __len__(self):
        return self.n // self.world - self.start


def length_grouped(perm: torch.Tensor, lengths, batch: int, seed: int, chunks=None, mega: int = 64
                   ) -> torch.Tensor:
    """LLaVA's length grouping: cut the shuffled order into chunks, sort each chunk by length and cut it
    into batches, then shuffle the order of the batches inside the chunk. A batch then holds samples of
    similar length (little padding), while which samples meet stays random.

    chunks: the sizes of consecutive runs of `perm` to group within; default "megabatches" of `mega`
    batches. A parquet file passes its row groups (in `grouped_order`'s order), so that a batch never
    reaches into another row group and each one is still read once per epoch. The rows left over at the
    end of a chunk (fewer than a batch) open the next chunk's first batch, which keeps every later batch
    aligned. `batch` = samples of one step across all ranks: rank r takes every world-th sample of a batch,
    so each rank's micro-batch comes from the same group. Deterministic in `seed`."""
    lengths = torch.as_tensor(lengths)
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    out, carry = [], perm[:0]
    for chunk in perm.split(chunks if chunks is not None else batch * mega):
        if len(carry):  # the previous chunk's last rows, completed by the start of this one
            fill = batch - len(carry)
            carry, chunk = torch.cat([carry, chunk[:fill]]), chunk[fill:]
            if len(carry) == batch:
                out.append(carry)
                carry = perm[:0]
            if not len(chunk):
                continue
        chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
        full = len(chunk) // batch * batch
        batches = chunk[:full].split(batch)
        out += [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        carry = chunk[full:]
    return torch.cat(out + [carry]) if out else perm


def group_runs(perm: torch.Tensor, group_sizes) -> list[int]:
    """The lengths of the runs of consecutive indices of `perm` that lie in one row group."""
    group = np.searchsorted(np.cumsum(group_sizes), perm.numpy(), side="right")
    cuts = np.flatnonzero(np.diff(group)) + 1
    return np.diff(np.concatenate([[0], cuts, [len(group)]])).tolist()


def read_groups(dataset, jsonl_block: int = 1024):
    """The runs of samples that are cheap to read together (sizes, in dataset order) for EpochSampler, or
    None when every order is as cheap as any other (jsonl files alone). A parquet file's runs are its row
    groups; beside parquet files, a jsonl file counts as blocks of jsonl_block samples, so its samples still
    mix with theirs, at that grain."""
    parts = getattr(dataset, "datasets", [dataset])
    if all(getattr(part, "group_sizes", None) is None for part in parts):
        return None
    sizes = []
    for part in parts:
        groups = getattr(part, "group_sizes", None)
        sizes += (list(groups) if groups is not None else
                  [min(jsonl_block, len(part) - k) for k in range(0, len(part), jsonl_block)])
    return np.array(sizes, dtype=np.int64)


def approx_lengths(dataset):
    """Per-sample approximate token counts of a dataset (or ConcatDataset) for --group-by-length."""
    parts = getattr(dataset, "datasets", [dataset])
    if not all(hasattr(d, "approx_lengths") for d in parts):
        raise UserError("--group-by-length needs --data files (synthetic data has no lengths to group by)")
    return np.concatenate([d.approx_lengths() for d in parts])
