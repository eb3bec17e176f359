"""Under torch.distributed every rank must end each step with the same memory."""
import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import timm_ait  # noqa: F401

TINY = dict(embed_dim=32, num_heads=2, num_slots=6, slot_dim=8, gwl_heads=2, bottleneck=10, img_size=16)


def _train_rank(rank, world_size, rdzv, out_dir, steps, nan_at=None):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{rdzv}', rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same initial weights and memory on every rank
        model = timm.create_model('ait_small_patch4_32', num_classes=4, **TINY)
        # no buffer broadcast: the memory must agree through the averaged write alone
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        torch.manual_seed(rank)
        model.reset_memory()  # ranks start from different memories: the averaged write must still agree
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        memory_after_step = []  # each step's written memory: ranks that drift apart can re-converge later
        for step in range(steps):
            x = torch.randn(4, 3, 16, 16, generator=gen)
            target = torch.randint(0, 4, (4,), generator=gen)
            if nan_at is not None and step == nan_at[1]:
                torch.save(model.state_dict(), os.path.join(out_dir, f'rank{rank}_before.pth'))
                if rank == nan_at[0]:
                    x[1, 2, 3, 4] = float('nan')  # one bad pixel on one rank
            loss = torch.nn.functional.cross_entropy(ddp(x), target) + 1e-2 * model.balance_loss()
            if nan_at is not None and step == nan_at[1]:
                break  # where a training script stops (a NaN loss); the memory this forward left is saved
            memory_after_step.append({k: v.clone() for k, v in model.state_dict().items()
                                      if k.endswith('memory.memory')})
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), os.path.join(out_dir, f'rank{rank}.pth'))
        torch.save(memory_after_step, os.path.join(out_dir, f'rank{rank}_steps.pth'))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed is not available')
def test_two_gloo_ranks_end_with_bit_identical_memory_and_weights(tmp_path):
    mp.spawn(_train_rank, args=(2, str(tmp_path / 'rdzv'), str(tmp_path), 3), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f'rank{r}.pth') for r in (0, 1))
    memory_keys = [k for k in a if k.endswith('memory.memory')]
    assert len(memory_keys) == 2
    init = timm.create_model('ait_small_patch4_32', num_classes=4, **TINY)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps_a, steps_b = (torch.load(tmp_path / f'rank{r}_steps.pth') for r in (0, 1))
    assert len(steps_a) == len(steps_b) == 3
    for step, (mem_a, mem_b) in enumerate(zip(steps_a, steps_b), start=1):
        assert sorted(mem_a) == sorted(memory_keys)
        for k in memory_keys:  # after every step, not only the last: rounding differences can wash out
            assert torch.equal(mem_a[k], mem_b[k]), f'after step {step}: {k}'
    for k in memory_keys:  # and the memory was written
        assert not torch.equal(a[k], init.state_dict()[k])


@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed is not available')
def test_a_non_finite_write_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """Rank 1 gets a NaN pixel at step 2: the rank average of the write is NaN everywhere, so all skip it."""
    mp.spawn(_train_rank, args=(2, str(tmp_path / 'rdzv'), str(tmp_path), 3, (1, 2)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f'rank{r}.pth') for r in (0, 1))
    before = torch.load(tmp_path / 'rank0_before.pth')
    memory_keys = [k for k in a if k.endswith('memory.memory')]
    assert len(memory_keys) == 2
    for k in memory_keys:
        assert torch.equal(a[k], b[k]), k  # the same memory on both ranks
        assert torch.equal(a[k], before[k]), k  # as it was before the bad write, on the good rank too
