"""infer/hugepages.py: the decoder's weights moved into one block of 2 MB pages for the compiled step."""
import copy
import mmap

import pytest
import torch

from minivlm.infer.hugepages import HUGE_PAGE, huge_page_buffer, is_packed, pack_in_huge_pages
from minivlm.model.lm import LMConfig, MiniMindLM

needs_madvise = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this OS")


def small_lm():
    torch.manual_seed(0)
    return MiniMindLM(LMConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=128))


@needs_madvise
def test_the_buffer_is_aligned_to_a_huge_page_and_writable():
    buf = huge_page_buffer(3 * HUGE_PAGE + 5)
    assert buf.dtype == torch.uint8 and buf.numel() == 3 * HUGE_PAGE + 5
    assert buf.data_ptr() % HUGE_PAGE == 0
    buf.fill_(7)
    assert int(buf.sum()) == 7 * buf.numel()


@needs_madvise
def test_packing_keeps_values_and_parameter_objects_and_counts_tied_weights_once():
    lm = small_lm()
    params = [*lm.model.parameters(), lm.lm_head.weight]  # lm_head is tied to embed_tokens: listed twice
    before = {id(p): p.detach().clone() for p in params}
    objects = [id(p) for p in lm.parameters()]
    assert not is_packed(params)
    assert pack_in_huge_pages(params)
    assert is_packed(params) and lm.lm_head.weight is lm.model.embed_tokens.weight
    assert [id(p) for p in lm.parameters()] == objects  # an optimizer holding them keeps working
    assert all(torch.equal(p, before[id(p)]) for p in params)
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1  # one block
    assert params[0].data_ptr() % HUGE_PAGE == 0
    assert all(p.data_ptr() % 64 == 0 and p.is_contiguous() for p in params)
    # the slices do not overlap: writing one leaves the others alone
    with torch.no_grad():
        params[0].zero_()
    assert all(torch.equal(p, before[id(p)]) for p in params[1:] if p is not params[0])
    assert not pack_in_huge_pages(params)  # already packed: nothing to do


@needs_madvise
def test_training_on_packed_weights_updates_them_in_place():
    lm = small_lm()
    pack_in_huge_pages(list(lm.parameters()))
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    w = lm.model.layers[0].mlp.up_proj.weight
    old = w.detach().clone()
    lm(torch.randint(0, 300, (2, 9)), labels=torch.randint(0, 300, (2, 9))).loss.backward()
    opt.step()
    assert not torch.equal(w, old) and is_packed(list(lm.parameters()))


@needs_madvise
def test_a_copy_or_a_cast_is_no_longer_packed():
    lm = small_lm()
    pack_in_huge_pages(list(lm.parameters()))
    twin = copy.deepcopy(lm)
    assert not is_packed(list(twin.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), lm.parameters()))
    lm.to(torch.bfloat16)  # new tensors in ordinary memory
    assert not is_packed(list(lm.parameters()))
    assert pack_in_huge_pages(list(lm.parameters())) and is_packed(list(lm.parameters()))


def test_nothing_to_pack_is_a_no_op():
    assert not pack_in_huge_pages([])
    assert not is_packed([])
