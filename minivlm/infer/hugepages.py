"""The decoder's weights in one block of 2 MB pages, for the compiled decode step (compiled_decode.py).

A batch-1 decode step streams every decoder weight from memory once per token (~100 MB for 26m in
fp32), so it runs at the rate one core can read memory. With the usual 4 KB pages that rate is held
down twice: the hardware prefetcher stops at every page boundary, and every 4 KB costs a TLB entry.
Linux can back a region with 2 MB pages instead (transparent huge pages) when asked with
madvise(MADV_HUGEPAGE). On the 2-core machine of docs/benchmarks.md, a plain read of a large buffer
ran 1.5-2x faster in 2 MB pages, and the compiled decode step 10-16 % faster (same process,
interleaved).

torch allocates each weight on its own (no 2 MB alignment, no madvise), so `pack_in_huge_pages`
copies the given parameters into one aligned anonymous mapping and points each parameter at its
slice (`p.data = view`): same values, same shapes, same Parameter objects (an optimizer holding them
keeps working); each old copy is freed as soon as it is replaced, so the resident memory barely
grows (26m: +14 MB for ~100 MB of weights, measured).
Elsewhere (no madvise, or the kernel has huge pages switched off) it is a no-op or a plain repack.
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20  # bytes: the x86-64 / arm64 transparent huge page


def huge_page_buffer(nbytes: int) -> torch.Tensor | None:
    """A uint8 tensor of nbytes, 2 MB-aligned, in an anonymous private mapping marked for huge pages;
    None where the OS offers no MADV_HUGEPAGE (macOS, Windows). The tensor keeps the mapping alive."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    # MAP_PRIVATE: a shared anonymous mapping is shared memory, which follows other huge-page rules.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: pages are chosen when first written
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE  # the kernel backs only aligned 2 MB stretches with huge pages
    return whole[start:start + nbytes]


def is_packed(params) -> bool:
    """Whether these parameters already live in one huge-page buffer made by pack_in_huge_pages."""
    params = list(params)
    return bool(params) and all(getattr(p, "_huge_page_base", None) == p.untyped_storage().data_ptr()
                                for p in params)


def pack_in_huge_pages(params) -> bool:
    """Move CPU parameters (tied ones counted once) into one huge-page buffer. -> whether it did."""
    unique = list({id(p): p for p in params}.values())
    if not unique or any(p.device.type != "cpu" for p in unique) or is_packed(unique):
        return False
    sizes = [-(-p.numel() * p.element_size() // 64) * 64 for p in unique]  # 64-byte aligned slices
    buffer = huge_page_buffer(sum(sizes))
    if buffer is None:
        return False
    offset = 0
    with torch.no_grad():
        for p, size in zip(unique, sizes):
            nbytes = p.numel() * p.element_size()
            p.data = buffer[offset:offset + nbytes].view(p.dtype).view(p.shape).copy_(p.data)
            # A copy of the model (deepcopy, pickle) gets ordinary memory and a storage of its own, which
            # this mark no longer matches, so the copy is packed again on its first compiled decode.
            p._huge_page_base = p.untyped_storage().data_ptr()
            offset += size
    return True
