"""How many KV pages the pool holds, and why: `plan_pool` is the one place that decides it.

- `--kv-cache-pages N`: N, as asked.
- `--device-memory-utilization U` (the default on accelerators: `ACCELERATOR_UTILIZATION`): U x the device's
  memory, less the weights.
- On CPU without either: `CPU_SHARE` of the machine's memory (never more than half of what is available at
  start), less the weights. The machine is shared with everything else the user runs: a 100 MB model must not
  take half a laptop's memory because its context is long. The pool is reserved, not filled (see
  `CacheSpec.allocate`): it becomes resident page by page as requests write it.

Never more than `max_batch_size` x `max_length` tokens need. When memory is the bound, the pool holds a whole
number of full-length sequences: its shape is part of every compiled executable (and of its compile-cache key),
so it must not move with the few MB by which available memory drifts from start to start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax

ACCELERATOR_UTILIZATION = 0.9
"""Share of a GPU's or TPU's memory the server takes when `--device-memory-utilization` is not given."""
CPU_SHARE = 0.25
"""Share of the machine's memory the KV pool takes on CPU when neither --kv-cache-pages nor
--device-memory-utilization is given (a fixed figure, so the pool's shape is the same from start to start)."""


def device_memory_bytes(device: jax.Device) -> int:
    """Accelerators report their memory; for a CPU device it is what the OS says is available now."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return _meminfo("MemAvailable")


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"cannot tell how much memory this machine has (no {field} in /proc/meminfo)")


@dataclass(frozen=True)
class PoolPlan:
    num_pages: int
    """Pages in the pool, page 0 (scratch) included."""
    why: str
    """What decided the size, and how to ask for another, for the start-up log."""


def plan_pool(
    *, device: jax.Device, bytes_per_page: int, page_size: int, max_batch_size: int, max_length: int,
    weight_bytes: int, num_pages: int | None = None, utilization: float | None = None,
) -> PoolPlan:
    """The pool for this device and these limits (see the module docstring). ValueError when not even one
    full-length sequence fits."""
    if num_pages is not None:
        return PoolPlan(num_pages, "--kv-cache-pages")
    pages_per_row = -(-max_length // page_size)
    wanted = max_batch_size * pages_per_row + 1
    need = f"{max_batch_size} sequences of {max_length} tokens need {wanted * bytes_per_page / 2**30:.1f} GiB"
    cpu_default = device.platform == "cpu" and utilization is None
    if cpu_default:
        total, available = _meminfo("MemTotal"), _meminfo("MemAvailable")
        budget = min(int(total * CPU_SHARE), available // 2) - weight_bytes
    else:
        budget = int(device_memory_bytes(device) * (utilization or ACCELERATOR_UTILIZATION))
        if device.platform == "cpu":
            budget -= weight_bytes  # not yet placed: on CPU the OS figure still counts them as free
    pages = plan_kv_pages(bytes_per_page=bytes_per_page, page_size=page_size, max_batch_size=max_batch_size,
                          max_length=max_length, budget_bytes=budget)
    if pages == wanted:
        return PoolPlan(pages, f"what {max_batch_size} sequences of {max_length} tokens need")
    held = f"{(pages - 1) // pages_per_row} full-length sequences ({need})"
    if cpu_default:
        return PoolPlan(pages, (
            f"{CPU_SHARE:.0%} of this machine's {total / 2**30:.1f} GiB, less the weights, holds {held}: ask for "
            "more with --device-memory-utilization (a share of the memory available at start) or "
            "--kv-cache-pages, or lower --max-batch-size or --max-length"
        ))
    return PoolPlan(pages, (
        f"--device-memory-utilization {utilization or ACCELERATOR_UTILIZATION} holds {held}: raise it, or lower "
        "--max-batch-size or --max-length"
    ))


def plan_kv_pages(
    *, bytes_per_page: int, page_size: int, max_batch_size: int, max_length: int, budget_bytes: int
) -> int:
    """Pages for the pool, page 0 (scratch) included: what `max_batch_size` full-length sequences need, or, when
    the budget holds less, a whole number of full-length sequences.
    Raises ValueError when not even one fits."""
    pages_per_row = -(-max_length // page_size)
    wanted = max_batch_size * pages_per_row + 1
    affordable = budget_bytes // bytes_per_page
    if affordable < pages_per_row + 1:
        raise ValueError(
            f"the KV cache budget ({max(budget_bytes, 0) / 2**20:.0f} MiB) holds {max(affordable, 0)} pages, less "
            f"than one sequence of max_length {max_length} needs ({pages_per_row + 1}): raise "
            "--device-memory-utilization or lower --max-length"
        )
    if affordable >= wanted:
        return wanted
    return (affordable - 1) // pages_per_row * pages_per_row + 1
