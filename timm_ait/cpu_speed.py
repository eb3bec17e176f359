"""CPU speed settings that change no result: how freed memory goes back to the allocator.

glibc's malloc serves a block of 128 KiB or more (a threshold it raises, up to 32 MiB, as such
blocks are freed) with its own ``mmap`` and gives it back to the kernel when it is freed, and it
trims the top of its heap when more than a threshold is free there. A training step frees and
allocates the same activation and gradient tensors every step, so every step faults the same
pages in again, and each fault is a trap and a page of zeroes (on a virtual machine, a slow one).
Keeping freed blocks in the heap makes the next step reuse them. Nothing is computed differently:
only where the tensors live changes.

The same settings through the environment, for a whole process tree (loader workers included)::

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 python train_scripts/train.py ...
"""
import ctypes
import ctypes.util
from typing import Dict, Optional

__all__ = [
    'CPU_TRAINING_ENV', 'KEEP_FREED_MEMORY_ENV', 'INITIAL_MMAP_THRESHOLD', 'keep_freed_memory', 'minor_page_faults',
    'set_malloc_thresholds',
]

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's mmap threshold at start (DEFAULT_MMAP_THRESHOLD_MIN), before freed blocks raise it
INITIAL_MMAP_THRESHOLD = 128 * 2 ** 10
# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX); larger is refused
MAX_MMAP_THRESHOLD = 32 * 2 ** 20
NEVER_TRIM = 2 ** 31 - 1  # mallopt takes an int

KEEP_FREED_MEMORY_ENV: Dict[str, str] = {
    'MALLOC_MMAP_THRESHOLD_': str(MAX_MMAP_THRESHOLD),
    'MALLOC_TRIM_THRESHOLD_': str(NEVER_TRIM),
}

# The environment of the CPU training runs (tools/run_evidence.py), with train.py in fp32 and
# --workers 0: freed memory kept, and OpenMP threads that sleep rather than spin while they wait
# (libgomp's OMP_WAIT_POLICY). Spinning threads that lose their core to another process stall every
# parallel region: two threads on this 2-core machine, shared, trained 1.7-4x slower spinning than
# sleeping (docs/results.md). Neither setting changes what is computed.
CPU_TRAINING_ENV: Dict[str, str] = {**KEEP_FREED_MEMORY_ENV, 'OMP_WAIT_POLICY': 'PASSIVE'}


def set_malloc_thresholds(mmap_threshold: Optional[int] = None, trim_threshold: Optional[int] = None) -> bool:
    """Fix glibc malloc's mmap and / or trim threshold in this process (``mallopt``); True if each was taken.

    A threshold set this way stays where it is: glibc no longer raises it as blocks are freed. Returns
    False, and changes nothing, where the C library is not glibc; stops at the first value glibc refuses.
    """
    name = ctypes.util.find_library('c')
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, 'mallopt') or not hasattr(libc, 'gnu_get_libc_version'):
        return False
    settings = [(param, value) for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                                    (_M_TRIM_THRESHOLD, trim_threshold)) if value is not None]
    return all(bool(libc.mallopt(param, value)) for param, value in settings)  # 1 on success, 0 refused


def keep_freed_memory() -> bool:
    """Serve blocks under 32 MiB from the heap and never trim it, in this process (glibc only).

    Returns False, and changes nothing, where the C library is not glibc. Blocks of 32 MiB or
    more are still mapped and unmapped one by one: glibc allows no higher threshold. Processes
    forked afterwards (data loader workers) inherit the setting.
    """
    return set_malloc_thresholds(mmap_threshold=MAX_MMAP_THRESHOLD, trim_threshold=NEVER_TRIM)


def minor_page_faults() -> Optional[int]:
    """Minor page faults of this process so far; None where the OS does not count them."""
    try:
        import resource
    except ImportError:  # not Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
