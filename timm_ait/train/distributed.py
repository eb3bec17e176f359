"""Distributed training: the process group with a timeout, and what to say when a rank is stuck."""
import os
import re
from datetime import timedelta

import torch
from timm.utils import init_distributed_device
from timm.utils.distributed import is_distributed_env, world_info_from_env

__all__ = ['init_distributed', 'stuck_rank_message']


def init_distributed(args) -> torch.device:
    """timm's init_distributed_device, with --dist-timeout given to the process group.

    timm's helper takes no timeout, so under torchrun (or SLURM) this does what it does (env://
    rendezvous, nccl on CUDA and gloo otherwise, one device per local rank) with the timeout.
    """
    if not is_distributed_env():
        return init_distributed_device(args)
    local_rank, rank, world_size = world_info_from_env()
    os.environ.update(LOCAL_RANK=str(local_rank), RANK=str(rank), WORLD_SIZE=str(world_size))  # SLURM's too
    device_type = str(args.device).split(':')[0]
    backend = args.dist_backend or ('nccl' if device_type == 'cuda' else 'gloo')
    timeout = timedelta(seconds=args.dist_timeout) if args.dist_timeout else None
    torch.distributed.init_process_group(backend=backend, init_method='env://', timeout=timeout)
    args.distributed, args.world_size = True, torch.distributed.get_world_size()
    args.rank, args.local_rank = torch.distributed.get_rank(), local_rank
    if device_type != 'cpu':
        args.device = f'{device_type}:{local_rank}'
        if device_type == 'cuda':
            torch.cuda.set_device(args.device)
    return torch.device(args.device)


def stuck_rank_message(error: RuntimeError):
    """What to say when a collective failed because another rank is stuck or died (gloo's and nccl's own
    errors say little), or None when ``error`` is something else."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    text = str(error)
    if not re.search(r'[Tt]imed out|[Tt]imeout|pair closure|Connection (reset|closed)|[Bb]roken pipe', text):
        return None
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return (f'rank {rank} of {world}: another rank did not answer within the process group timeout '
            f'(--dist-timeout): it is stuck or died; stopping the run ({text.strip().splitlines()[0][:200]})')
