"""Timing and memory helpers shared by the side-by-side benchmarks.

- ``interleaved_times``: warm up, then time several implementations in alternating order
  (A B, B A, A B ...), so that slow phases of a shared, noisy machine hit all of them alike;
  report medians.
- ``StepMemory``: the peak memory one call adds on top of what was live before it:
  ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's resident-set high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set at the start, after
  handing freed heap pages back to the OS (glibc ``malloc_trim``). Where /proc cannot be reset,
  it falls back to ``tracemalloc`` (which sees only Python allocations, not tensor storage) and
  says so in ``method``.
"""

import ctypes
import ctypes.util
import gc
import statistics
import time
import tracemalloc
from typing import Callable, Dict, List, Sequence

import torch

MiB = 1024.0 * 1024.0


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def interleaved_times(steps: Dict[str, Callable[[], None]], repeats: int, warmup: int,
                      device: torch.device, log: Callable[[str], None] = lambda _: None
                      ) -> Dict[str, Dict[str, List[float]]]:
    """Seconds per call of each function, ``repeats`` times each after ``warmup`` untimed calls:
    ``{name: {"wall": [...], "cpu": [...]}}`` (``cpu``: this process's CPU seconds, all
    threads, user + system; on a shared CPU it is less disturbed by other jobs than wall time).

    Calls alternate between the implementations and the order is reversed every round, so
    neither side always runs first (after the other's allocations, in a warmer cache ...).
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    synchronize(device)
    times = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            synchronize(device)
            cpu_start, start = time.process_time(), time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name]["wall"].append(time.perf_counter() - start)
            times[name]["cpu"].append(time.process_time() - cpu_start)
        log("  round %d: %s" % (r + 1, "  ".join(
            f"{n} {times[n]['wall'][-1] * 1e3:.0f} ms (cpu {times[n]['cpu'][-1] * 1e3:.0f})"
            for n in names)))
    return times


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


class StepMemory:
    """``with StepMemory(device) as m: step()`` -> ``m.peak_bytes``: the most memory in use at
    any time inside the block minus what was in use when it began."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif _can_reset_hwm():
            self.method = "RSS high-water mark (/proc VmHWM)"
        else:
            self.method = "tracemalloc (Python objects only)"

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("RSS"):
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _proc_status_kib("VmRSS") * 1024
        else:
            tracemalloc.start()
            self._base = 0
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("RSS"):
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        self.peak_bytes = max(0, peak - self._base)
        return False


def tensor_bytes(tensors) -> int:
    """Bytes held by distinct tensor storages among ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def optimizer_state_tensors(optimizer):
    """Every tensor a torch optimizer (or a wrapper with ``.optimizer``) keeps between steps:
    the parameters it updates (fp32 masters for a float16 wrapper) and their state."""
    torch_opt = getattr(optimizer, "optimizer", optimizer)
    for group in torch_opt.param_groups:
        yield from group["params"]
    for state in torch_opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value
