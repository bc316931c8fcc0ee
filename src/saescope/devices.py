"""Where tensors live: the `--device` of every verb, in one place.

    --device auto      CUDA when torch sees a GPU, else the CPU (the default)
    --device cpu       the CPU, even when a GPU is there
    --device cuda      the current CUDA device;  cuda:N  the N-th

The CLI sets the process's device once (`use`); everything that loads a model or
makes tensors asks `current()`. On a GPU the model runs in bf16 and SAEs train in
fp32 (models.py, train.py) with their fp32 matrix products in TF32 (set by `use`). `prefetch` moves host batches to the device through
pinned memory on a background thread, so that disk reads and copies overlap the
GPU's work.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator

import torch

from .errors import SaescopeError

_current: torch.device | None = None


def resolve(spec: str | torch.device | None = "auto") -> torch.device:
    """auto | cpu | cuda | cuda:N → a device torch can use here, or one clear line saying why not."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SaescopeError(f"--device {spec}: torch sees no CUDA GPU here (a CPU build of torch, or no "
                                "driver): use --device cpu or auto")
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise SaescopeError(f"--device {spec}: write cuda or cuda:N with N a number") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SaescopeError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                f"numbered 0..{torch.cuda.device_count() - 1}")
        return dev
    raise SaescopeError(f"unknown --device '{spec}': use auto, cpu, cuda or cuda:N")


def use(spec: str | torch.device | None) -> torch.device:
    """Set the device for the rest of this process (what `current()` returns)."""
    global _current
    _current = resolve(spec)
    if _current.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 storage and accumulation, TF32 products
        if _current.index is not None:
            torch.cuda.set_device(_current)
    return _current


def current() -> torch.device:
    """The device set by `use`, else auto."""
    return _current if _current is not None else resolve("auto")


def describe(dev: torch.device | None = None) -> str:
    """The device in words, for manifests and benchmark records: 'cpu' or 'cuda:0 (NVIDIA H200)'."""
    dev = dev or current()
    if dev.type != "cuda":
        return str(dev)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def prefetch(batches: Iterable[dict], device: torch.device, depth: int = 2) -> Iterator[dict]:
    """Yield each dict of arrays/tensors moved to `device`, reading ahead of the consumer.

    On CUDA a background thread reads the next batches (disk, numpy), pins them and starts
    non-blocking copies on a side stream, so the GPU never waits for the host. On the CPU it
    converts in place with no thread (the result is the same).
    """
    if device.type != "cuda":
        for batch in batches:
            yield {k: _tensor(v) for k, v in batch.items()}
        return
    stream = torch.cuda.Stream(device)
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for batch in batches:
                with torch.cuda.stream(stream):
                    moved = {k: _tensor(v).pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
                    event = torch.cuda.Event()
                    event.record(stream)
                while not stop.is_set():
                    try:
                        ready.put((moved, event), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(None)
        except BaseException as err:  # handed to the consumer, raised there
            ready.put(err)

    thread = threading.Thread(target=work, name="saescope-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            moved, event = item
            torch.cuda.current_stream(device).wait_event(event)
            for t in moved.values():
                t.record_stream(torch.cuda.current_stream(device))
            yield moved
    finally:
        stop.set()
        thread.join(timeout=5)


def _tensor(v) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.from_numpy(v)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """One CPU thread inside (no-op on a GPU): for many small ops (the atlas's scatter/gather bookkeeping) a second
    thread gains little and loses up to 8× when another process competes for the cores."""
    old = torch.get_num_threads()
    if device.type != "cpu" or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_DECODING = threading.local()


def idle_cpus(sample_s: float = 0.1) -> float:
    """How many of the machine's cores sat idle over the next `sample_s` seconds (Linux /proc/stat; this process
    sleeps meanwhile, so its own core counts as idle); 1.0 where that cannot be read."""

    def read() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    try:
        idle0, total0 = read()
        time.sleep(sample_s)
        idle1, total1 = read()
    except (OSError, ValueError, IndexError):
        return 1.0
    if total1 <= total0:
        return 1.0
    return (os.cpu_count() or 1) * (idle1 - idle0) / (total1 - total0)


@contextlib.contextmanager
def decode_threads(device: torch.device) -> Iterator[None]:
    """CPU threads for generating text (steering and its calibration; no-op on a GPU): torch's threads, as many as
    cores are idle right now, at least one. Decoding is many small products: on a quiet machine a second thread
    makes a cold `steer --concept` 1.4× faster (bench/RESULTS.md), but a thread that has to wait for a core taken
    by another process can make it several times slower, so the cores are counted first. Nested uses keep the
    outer count. `OMP_NUM_THREADS=1` (torch's own cap) makes decoding single-threaded everywhere."""
    old = torch.get_num_threads()
    if device.type != "cpu" or getattr(_DECODING, "active", False):
        yield
        return
    _DECODING.active = True
    torch.set_num_threads(max(1, min(old, round(idle_cpus()))))
    try:
        yield
    finally:
        torch.set_num_threads(old)
        _DECODING.active = False
