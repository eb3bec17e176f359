"""The blocked top-k timed in tools/gwl_candidates.py keeps the same set as torch.topk (the docs' claim)."""
import pytest
import torch

from tools.gwl_candidates import blocked_topk, main, plain_topk


def _kept(indices):
    return indices.sort(-1).values


@pytest.mark.parametrize('case', ['random', 'clustered', 'one_block_each'])
def test_blocked_topk_keeps_the_top_k_set(case):
    g = torch.Generator().manual_seed(0)
    T, rows, k, block = 96, 6, 8, 4
    scores = torch.randn(T, rows, generator=g)
    if case == 'clustered':  # the k largest crowd into two blocks
        scores[:8] += 10
    elif case == 'one_block_each':  # the k largest spread one per block, each block's other entries low
        scores[::block] += 10
    values, idx = blocked_topk(scores, k, block)
    want_values, want_idx = plain_topk(scores, k)
    assert torch.equal(_kept(idx), _kept(want_idx))
    assert torch.equal(values.sort(-1).values, want_values.sort(-1).values)
    assert torch.equal(scores.t().gather(-1, idx), values)


def test_pool_not_a_multiple_of_the_block_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(['--pool', '100', '--block', '8'])
    assert 'not a multiple of --block 8' in capsys.readouterr().err
