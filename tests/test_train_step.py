"""The training step reads nothing from the device between log intervals, and a non-finite step is
skipped on the device, counted there, and stops the run at the next read."""
import re
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3

from timm_ait.train import loop
from timm_ait.train.args import check_args, parse_args
from timm_ait.train.evaluate import amp_context
from timm_ait.train.task import AiTClassificationTask

# 7 steps of 8 images; reads at steps 0, 3 and 6 (the last)
TINY = ['--model', 'ait_tiny_patch32_64', '--dataset', 'triangle', '-b', '8', '--workers', '0', '--epochs', '2',
        '--train-num-samples', '56', '--val-num-samples', '8', '--warmup-epochs', '0', '--log-interval', '3',
        '--clip-grad', '1.0', '--model-ema', '--sched-on-updates']


class HostReads(TorchDispatchMode):
    """Counts every read of a tensor's value by the host: the scalar reads (item, float, bool, int,
    format, an `if` on a tensor all go through aten._local_scalar_dense) and tolist/numpy, which read
    the memory directly. ``ignore(tensor)``: reads that are no device sync (a host-resident tensor)."""

    def __init__(self, ignore=lambda t: False):
        super().__init__()
        self.count, self.ignore, self.where, self.paused = 0, ignore, [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.ignore(args[0]) and not self.paused:
            self.count += 1
            self.where.append(''.join(traceback.format_stack(limit=6)[:-1]))
        return func(*args, **(kwargs or {}))

    def counted(self, method):
        def read(tensor, *a, **k):
            if self.paused:
                return method(tensor, *a, **k)
            self.count += 1
            self.where.append(''.join(traceback.format_stack(limit=6)[:-1]))
            return method(tensor, *a, **k)
        return read


class Batches:
    """The loader, noting the number of host reads when each batch is taken (so reads[k] is step k's).
    The loader's own reads are not counted: its sampler's indices are host tensors (on a GPU the
    batches come from worker processes or a prefetcher)."""

    def __init__(self, loader, reads):
        self.loader, self.reads, self.at = loader, reads, []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            self.reads.paused = True
            try:
                batch = next(batches)
            except StopIteration:
                break
            finally:
                self.reads.paused = False
            self.at.append(self.reads.count)
            yield batch
        self.at.append(self.reads.count)

    def per_step(self):
        return [b - a for a, b in zip(self.at, self.at[1:])]


def training(tmp_path, *flags):
    torch.manual_seed(0)
    args = parse_args([*TINY, '--data-dir', str(tmp_path / 'data'), *flags])
    check_args(args)
    args.distributed, args.world_size, args.rank = False, 1, 0
    device = torch.device('cpu')
    model = loop.create_task_model(args, device)
    train_loader, _, mixup_fn, _ = loop.build_loaders(args, model, device)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=len(train_loader))
    ema = ModelEmaV3(model, decay=args.model_ema_decay)
    task = AiTClassificationTask(model, verbose=False)
    return args, model, train_loader, optimizer, scheduler, ema, task


def adam_step_counts(optimizer):
    """Adam's step counts: host tensors by design (torch keeps them on the CPU unless capturable, also
    when the parameters are on a GPU), so reading them is no device sync."""
    return {s['step'].data_ptr() for s in optimizer.state.values() if isinstance(s.get('step'), torch.Tensor)}


# the tiny AiT keeps all 40 patches of a batch (k = 64, capped: dense products); bottleneck=2 keeps 2 (gathers, and the top-k's
# gradient at the kept scores)
@pytest.mark.parametrize('flags', [[], ['--model-kwargs', 'bottleneck=2']])
def test_no_host_read_between_log_intervals(tmp_path, monkeypatch, flags):
    args, model, loader, optimizer, scheduler, ema, task = training(tmp_path, *flags)
    reads = HostReads(ignore=lambda t: t.data_ptr() in adam_step_counts(optimizer))
    for name in ('tolist', 'numpy'):
        monkeypatch.setattr(torch.Tensor, name, reads.counted(getattr(torch.Tensor, name)))
    batches = Batches(loader, reads)
    with reads:
        metrics = loop.train_one_epoch(0, task, batches, optimizer, scheduler, args, torch.device('cpu'),
                                       amp_context(False, '', None), None, ema, None)
    assert len(loader) == 7
    assert batches.per_step() == [1, 0, 0, 1, 0, 0, 1], '\n'.join(reads.where)
    assert set(metrics) == {'loss', 'task_loss', 'balance_loss', 'aux_loss'}


def weights_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize('broken', ['loss', 'gradients'])
def test_a_non_finite_step_is_skipped_on_the_device_and_stops_the_run_at_the_next_read(broken, tmp_path):
    """Two steps whose second is broken (a NaN image: a NaN loss; or an inf gradient of a finite loss)
    end with the weights of the first step alone, taken by the same loop, and stop at the read after
    the second step with the message of the broken one."""
    args, model, loader, optimizer, scheduler, _, task = training(tmp_path)
    args.log_interval = 10  # one read, after the last step
    batches = [b for b, _ in zip(loader, range(2))]
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt_initial = optimizer.state_dict()

    def run(steps):
        model.load_state_dict(initial)
        optimizer.load_state_dict(opt_initial)
        loop.train_one_epoch(0, task, steps, optimizer, scheduler, args, torch.device('cpu'),
                             amp_context(False, '', None), None, None, None)

    first = run([batches[0]]) or weights_of(model)
    images, target = batches[1]
    hook = None
    if broken == 'loss':
        images = torch.full_like(images, float('nan'))
    else:
        calls = []

        def inf_once(grad):  # the second backward's gradient of one weight overflows
            calls.append(1)
            return grad * float('inf') if len(calls) == 2 else grad
        hook = next(model.parameters()).register_hook(inf_once)
    with pytest.raises(loop.NonFiniteLossError) as stopped:
        run([batches[0], (images, target)])
    if hook is not None:
        hook.remove()
    what = (r'the training loss is nan at epoch 0, batch 2/2 \(task loss nan, balance loss nan\)' if broken == 'loss'
            else r'the gradients are not finite at epoch 0, batch 2/2 \(loss \d')
    assert re.match(what, str(stopped.value)), str(stopped.value)
    assert 'its update was skipped, and the run stops with the checkpoints of the last finished epoch' \
        in str(stopped.value)
    weights = weights_of(model)
    assert weights.keys() == first.keys()
    for k in weights:
        torch.testing.assert_close(weights[k], first[k], rtol=0, atol=0, msg=k)
