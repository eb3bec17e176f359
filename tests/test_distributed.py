"""Under DDP training every rank must end each step with the same memory; a model outside DDP keeps its own."""
import os
import time
from datetime import timedelta

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


def _solo_training(seed, steps):
    """A few training steps of a tiny AiT of its own (its seed, its data), and its state dict (one thread, so
    that the sums round as on the ranks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _steps(seed, steps)
    finally:
        torch.set_num_threads(threads)


def _steps(seed, steps):
    torch.manual_seed(seed)
    model = timm.create_model('ait_small_patch4_32', num_classes=4, **TINY)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        x, target = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 4, (4,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), target) + 1e-2 * model.balance_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


def _independent_rank(rank, world_size, rdzv, out_dir, steps):
    torch.set_num_threads(1)
    # a short timeout: a write that waited for the other rank would fail here instead of hanging the tests
    dist.init_process_group('gloo', init_method=f'file://{rdzv}', rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=20))
    try:
        torch.save(_solo_training(rank, steps), os.path.join(out_dir, f'rank{rank}.pth'))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed is not available')
def test_independent_models_on_two_ranks_keep_their_own_memories(tmp_path):
    """A sweep or an ensemble: each rank trains a model of its own, without DDP, in one process group."""
    mp.spawn(_independent_rank, args=(2, str(tmp_path / 'rdzv'), str(tmp_path), 2), nprocs=2, join=True)
    for rank in (0, 1):
        ranked, alone = torch.load(tmp_path / f'rank{rank}.pth'), _solo_training(rank, 2)
        for k in alone:  # bit for bit what the same steps give without any process group
            assert torch.equal(ranked[k], alone[k]), (rank, k)


def _one_rank_forward(rank, world_size, rdzv, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{rdzv}', rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=20))
    done = os.path.join(out_dir, 'done')
    try:
        if rank == 0:  # a training-mode forward on this rank only, as analysis.analyze() runs one
            torch.manual_seed(0)
            model = timm.create_model('ait_small_patch4_32', num_classes=4, **TINY).train()
            model(torch.randn(2, 3, 16, 16))
            open(done, 'w').close()
        else:  # the other rank takes part in no collective; it waits for rank 0 to finish
            deadline = time.monotonic() + 60
            while not os.path.exists(done) and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed is not available')
def test_a_forward_outside_ddp_on_one_rank_does_not_wait_for_the_others(tmp_path):
    mp.spawn(_one_rank_forward, args=(2, str(tmp_path / 'rdzv'), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / 'done').exists()
