"""Peak memory, measured: of one prefill (`prefill_peak`), of a serving batch (`serving_peak`), and the largest batch
that fits under a limit (`largest_batch`).

On CUDA the figure is the allocator's own peak above its use at the start (`torch.cuda.max_memory_allocated`): exact,
in-process. On a CPU it is the kernel's peak resident set (VmHWM, reset through /proc/self/clear_refs) above the
resident memory at the start, in a fresh process per measurement (`python -m modalkv.peak_memory ...`,
`measure_in_subprocess`): in a long-lived process freed memory stays with the allocator, so every run after the first
would look cheaper. The subprocess fixes glibc's mmap threshold, so that large buffers come from and go back to the
system as torch allocates and frees them, and the peak resident set follows the peak of live tensors. Weights and
libraries are loaded before the start and are not in the figure. Measuring the same run again moves the CPU figure by
about 0.1 MiB (the kernel's resident-set accounting, the allocator's placement): a batch whose peak is that close to a
limit may not fit on a second try.

A serving batch of N (`serving_peak`): `DISTINCT_PROMPTS` prompts are prefilled together and their rows repeated to N
(a copy each: real memory; the copying itself is before the peak is reset), then one more prompt is prefilled while
the N are held (a request admitted), and the N sequences decode `decode_tokens` greedy steps. The peak covers the
admission and the decoding: "N sequences in flight, room to prefill the next". Only N distinct prefills would be more
faithful, at N times the prefill cost; a repeated row holds what its original kept (for a fixed-budget method the same
count as any prompt of that length), and a decoding step costs the same whatever the tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from modalkv.bench import Decoder, Prompts, held_bytes, make_cache
from modalkv.models import EMBEDDED_MODELS, load_model, parse_dtype
from modalkv.presses import Press

# Allocations above this many bytes are mmap'd and unmapped when freed (glibc otherwise raises its threshold as large
# blocks are freed, and keeps them in its heap: resident, no longer live).
MMAP_THRESHOLD = 1 << 16
DISTINCT_PROMPTS = 4  # prompts prefilled for a serving batch, their rows repeated to the batch size
_libc = ctypes.CDLL(None) if sys.platform == "linux" else None


class PeakMeter:
    """Bytes above the use at construction, at the highest point since the last `reset()`: the CUDA allocator's peak,
    or the peak resident set of this process (Linux).

    `cap` (bytes, CPU): from the next `reset()` on, the process may not grow past the use at construction plus `cap`
    (its address space is limited accordingly; an allocation beyond fails), so that what is said to fit is run under
    the limit."""

    def __init__(self, device: torch.device, cap: int | None = None):
        self.cuda = device.type == "cuda"
        self.cap = cap
        if not self.cuda and not Path("/proc/self/clear_refs").exists():
            raise ValueError("peak memory on a CPU is read from Linux's /proc/self (VmHWM); this system has none")
        release_freed()
        self.start = torch.cuda.memory_allocated() if self.cuda else _status_bytes("VmRSS")
        cap, self.cap = cap, None
        self.reset()
        self.cap = cap

    def reset(self) -> None:
        """The peak restarts from the current use (and the cap, if any, applies from here on)."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident set restarts from the current one
        if self.cap is not None:
            allowed = self.cap - (_status_bytes("VmRSS") - self.start)
            resource.setrlimit(resource.RLIMIT_AS, (_status_bytes("VmSize") + allowed, resource.RLIM_INFINITY))

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.start
        return _status_bytes("VmHWM") - self.start


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/self/status has no {field}")


def release_freed() -> None:
    """Frees unreachable tensors now and returns the allocator's free pages to the system (CPU) or drops its cached
    blocks (CUDA), so that the next reading starts from live memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _libc is not None:
        _libc.malloc_trim(0)


@torch.no_grad()
def prefill_peak(model: PreTrainedModel, press: Press | None, prompt: torch.Tensor) -> dict:
    """Peak memory added by one prefill of `prompt` [B, S] (press None: DynamicCache), and the cache it leaves."""
    model(prompt[:, :8])  # load kernels and thread pools before the starting reading
    meter = PeakMeter(prompt.device)
    cache = make_cache(model, press, prompt.shape[1], 0, compile=False)
    with press.attach(model) if press is not None else contextlib.nullcontext():
        Decoder.prefill(model, Prompts(prompt), cache)
    peak = meter.peak()
    return {"context": prompt.shape[1], "prefill_peak_mib": peak / 2**20, "cache_mib": held_bytes(cache)[0] / 2**20}


@dataclass
class ServingPeak:
    """One `serving_peak` measurement."""

    batch: int
    context: int
    decode_tokens: int
    peak_bytes: int  # above the model alone: admission of one more prompt, then decoding, whichever is higher
    cache_bytes: int  # K/V held by the batch after decoding (+ the press's state: memory_bytes)
    memory_bytes: int
    ms_per_step: float  # median decoding step of the batch
    tokens_per_second: float


@torch.no_grad()
def serving_peak(
    model: PreTrainedModel,
    press: Press | None,
    prompts: torch.Tensor,
    batch: int,
    decode_tokens: int,
    cap: int | None = None,
) -> ServingPeak:
    """N = `batch` sequences in flight (module docstring). prompts: [k + 1, S] distinct prompts; the first
    min(k, batch) are prefilled and repeated to `batch` rows, the last one is the admitted request. `cap`: see
    `PeakMeter` (the admission and the decoding run under it)."""
    model(prompts[:1, :8])  # load kernels and thread pools before the starting reading
    meter = PeakMeter(prompts.device, cap)
    held = prompts[: min(batch, prompts.shape[0] - 1)]
    cache = make_cache(model, press, prompts.shape[1], decode_tokens, compile=False)
    with press.attach(model) if press is not None else contextlib.nullcontext():
        decoder = Decoder.prefill(model, Prompts(held), cache)
        rows = torch.arange(batch, device=prompts.device) % held.shape[0]
        cache.batch_select_indices(rows)
        decoder.logits = decoder.logits[rows]
        release_freed()
        meter.reset()
        admitted = make_cache(model, press, prompts.shape[1], 0, compile=False)
        Decoder.prefill(model, Prompts(prompts[-1:]), admitted)  # admitted, then let go: N stay in flight
        del admitted
        steps = []
        for _ in range(decode_tokens):
            start = time.perf_counter()
            decoder.step()
            if prompts.is_cuda:
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - start)
    peak = meter.peak()
    kept, memory, _, _ = held_bytes(cache)
    ms = 1000 * statistics.median(steps[2:] or steps)
    return ServingPeak(batch, prompts.shape[1], decode_tokens, peak, kept, memory, ms, 1000 * batch / ms)


def largest_batch(peak_of: Callable[[int], int], limit: int, on_trial: Callable[[int, int], None] | None = None):
    """The largest batch N whose measured peak `peak_of(N)` is at most `limit` bytes, with the peaks measured on the
    way ({N: bytes}); N = 0 when one sequence does not fit. Memory grows about linearly with the batch, so each probe
    is where the line through two measured batches reaches the limit (4x the largest fitting batch where the line is
    flat); every claim is checked by measurement: N fits and N + 1 does not. Once the answer is bracketed, two probes
    in a row that move the same end are followed by the midpoint, so that a curved peak cannot make the search crawl.
    """
    peaks: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in peaks:
            peaks[n] = peak_of(n)
            if on_trial is not None:
                on_trial(n, peaks[n])
        return peaks[n] <= limit

    if not fits(1):
        return 0, peaks
    low, high = 1, None  # low fits; high, once known, does not
    moved, stalled = None, False
    while high is None or high - low > 1:
        if low == 1:
            probe = 2
        elif high is None:
            slope = (peaks[low] - peaks[1]) / (low - 1)
            probe = low + max(1, int((limit - peaks[low]) / slope) if slope > 0 else 3 * low)
        elif stalled:
            probe = (low + high) // 2
        else:
            slope = (peaks[high] - peaks[low]) / (high - low)
            probe = min(max(low + int((limit - peaks[low]) / slope), low + 1), high - 1)
        before, moved = moved, "low" if fits(probe) else "high"
        low, high = (probe, high) if moved == "low" else (low, probe)
        stalled = high is not None and moved == before
    return low, peaks


def capacity(
    model: str,
    dtype: str,
    press: Press | None,
    prompts: torch.Tensor,
    limit: int,
    decode_tokens: int,
    threads: int,
    on_trial: Callable[[int, int], None] | None = None,
) -> dict:
    """The largest serving batch of `press` (None: DynamicCache) under `limit` bytes, each trial a fresh process
    (`measure_in_subprocess`), `prompts` [DISTINCT_PROMPTS + 1, S]; the row says what peaked and how fast it decoded
    at that batch (tokens/s from that trial's own steps)."""
    measured: dict[int, dict] = {}

    def peak_of(batch: int) -> int:
        measured[batch] = measure_in_subprocess(
            model, dtype, press, prompts, batch=batch, decode_tokens=decode_tokens, threads=threads
        )
        return measured[batch]["peak_bytes"]

    best, peaks = largest_batch(peak_of, limit, on_trial)
    at_best = measured.get(best, {})
    return {
        "method": "dynamic_cache" if press is None else press.label(),
        "budget": 1.0 if press is None else press.budget,
        "context": prompts.shape[1],
        "memory_limit_bytes": limit,
        "decode_tokens": decode_tokens,
        "max_batch": best,
        "peak_bytes": at_best.get("peak_bytes"),
        "tokens_per_second": at_best.get("tokens_per_second"),
        "bytes_per_sequence": (at_best["cache_bytes"] + at_best["memory_bytes"]) / best if best else None,
        "trials": {str(batch): peak for batch, peak in sorted(peaks.items())},
    }


# -- fresh processes -------------------------------------------------------------------------------------------------


def load_weights(name: str, dtype: torch.dtype) -> PreTrainedModel:
    """An embedded model by name, or a causal LM from a folder (weights only: prompts come as token ids)."""
    if name in EMBEDDED_MODELS:
        return load_model(name, dtype=dtype)[0]
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa").eval()


def measure_in_subprocess(
    model: str,
    dtype: str,
    press: Press | None,
    prompts: torch.Tensor,
    *,
    batch: int | None = None,
    decode_tokens: int = 0,
    threads: int = 1,
    enforce_limit: int | None = None,
) -> dict:
    """`prefill_peak` of `prompts` (batch None) or `serving_peak` of `batch` sequences, in a fresh Python process
    (press None: DynamicCache). `enforce_limit` (bytes) caps the process's memory at its use after loading plus this
    much from the admission on (`PeakMeter`'s cap; serving only): going over it fails the run."""
    with tempfile.TemporaryDirectory() as folder:
        payload = Path(folder) / "cell.pt"
        torch.save({"press": press, "prompts": prompts.cpu()}, payload)
        spec = {
            "model": model,
            "dtype": dtype,
            "cell": str(payload),
            "batch": batch,
            "decode_tokens": decode_tokens,
            "threads": threads,
            "enforce_limit": enforce_limit,
        }
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_ARENA_MAX": "1"}
        command = [sys.executable, "-m", "modalkv.peak_memory", json.dumps(spec)]
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        name = "dynamic_cache" if press is None else press.label()
        what = f"{name}, {prompts.shape[1]} tokens" + (f", batch {batch}" if batch else "")
        raise RuntimeError(f"memory measurement failed ({what}): {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", help="JSON: see measure_in_subprocess")
    spec = json.loads(parser.parse_args().spec)
    torch.set_num_threads(spec["threads"])
    model = load_weights(spec["model"], parse_dtype(spec["dtype"]))
    cell = torch.load(spec["cell"], weights_only=False)  # our own file: a press and the prompts
    press, prompts = cell["press"], cell["prompts"]
    if spec["batch"] is None:
        print(json.dumps(prefill_peak(model, press, prompts)))
    else:
        measured = serving_peak(model, press, prompts, spec["batch"], spec["decode_tokens"], spec["enforce_limit"])
        print(json.dumps(asdict(measured)))


if __name__ == "__main__":
    main()
