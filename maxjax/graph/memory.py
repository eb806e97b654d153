"""How many KV pages fit: `--device-memory-utilization` x the device's memory, less what the weights take,
never more than `max_batch_size` x `max_length` tokens need."""

from __future__ import annotations

import logging
from pathlib import Path

import jax

log = logging.getLogger(__name__)


def device_memory_bytes(device: jax.Device) -> int:
    """Accelerators report their memory; for a CPU device it is what the OS says is available now."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell how much memory this machine has (no MemAvailable in /proc/meminfo)")


def plan_kv_pages(
    *, bytes_per_page: int, page_size: int, max_batch_size: int, max_length: int, budget_bytes: int
) -> int:
    """Pages for the pool, page 0 (scratch) included: what `max_batch_size` full-length sequences need, or, when
    the budget holds less, a whole number of full-length sequences. Raises ValueError when not even one fits."""
    pages_per_row = -(-max_length // page_size)
    wanted = max_batch_size * pages_per_row + 1
    affordable = budget_bytes // bytes_per_page
    if affordable < pages_per_row + 1:
        raise ValueError(
            f"the KV cache budget ({budget_bytes / 2**20:.0f} MiB) holds {affordable} pages, less than one "
            f"sequence of max_length {max_length} needs ({pages_per_row + 1}): raise "
            "--device-memory-utilization or lower --max-length"
        )
    if affordable >= wanted:
        return wanted
    # Memory-bound: a whole number of max-length sequences. The pool's shape is part of every compiled executable
    # (and of its compile-cache key); rounding keeps it the same from start to start while what the OS reports
    # available moves by a few MB, so a warm start still finds its executables.
    return (affordable - 1) // pages_per_row * pages_per_row + 1
