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
    sample (reading a row group costs milliseconds to a second)."""

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
            perm = length_grouped(perm, self.lengths, self.batch_size * self.world, self.seed + self.epoch)
        per_rank = self.n // self.world  # equal shares, so all ranks take the same number of steps
        return perm[self.rank:per_rank * self.world:self.world][self.start:].tolist()

    def __iter__(self):
        return iter(self.indices())

    def __len__(self):
        return self.n // self.world - self.start


def length_grouped(perm: torch.Tensor, lengths, batch: int, seed: int, mega: int = 64) -> torch.Tensor:
    """LLaVA's length grouping: cut the shuffled order into "megabatches" of `mega` batches, sort each
    by length (longest first), cut it into batches, and shuffle the order of all batches. A batch then
    holds samples of similar length (little padding), while which samples meet stays random.
    `batch` = samples of one step across all ranks: rank r takes every world-th sample of a batch, so
    each rank's micro-batch comes from the same group. Deterministic in `seed`."""
    lengths = torch.as_tensor(lengths)
    chunks = [c[torch.argsort(lengths[c], descending=True, stable=True)] for c in perm.split(batch * mega)]
    batches = list(torch.cat(chunks).split(batch)) if chunks else []
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed + 1_000_003))
    return torch.cat([batches[i] for i in order.tolist()]) if batches else perm


def approx_lengths(dataset):
    """Per-sample approximate token counts of a dataset (or ConcatDataset) for --group-by-length."""
    parts = getattr(dataset, "datasets", [dataset])
    if not all(hasattr(d, "approx_lengths") for d in parts):
        raise UserError("--group-by-length needs --data files (synthetic data has no lengths to group by)")
    return np.concatenate([d.approx_lengths() for d in parts])
