"""Shared pieces of the training and inference benchmarks: the demo data, the machine's
description (CPU model, load), its matrix-product rate per dtype, FLOP counting and profiles."""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Imported before torch so that its process-wide settings (OpenMP's wait policy) apply here as
# they do in train.py; an older pcvr without them is measured as it is.
import pcvr.runtime  # noqa: E402,F401

import torch  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}


def ensure_online_data(rows: int, seq_len_scale: float, seed: int = 0) -> str:
    """Generates (once, cached) demo data with the online schema's real vocabulary sizes.

    Runs in a subprocess so that the generator's memory does not count in the peak RSS.
    """
    out = os.path.join(ROOT, ".demo_data", f"bench_online_r{rows}_s{seq_len_scale:g}_seed{seed}")
    if not os.path.isfile(os.path.join(out, "schema.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "demo_data.py"), "--out", out,
                        "--rows", str(rows), "--seed", str(seed), "--vocab_cap", "0",
                        "--seq_len_scale", str(seq_len_scale), "--eval_rows", "0"],
                       check=True)
    return out


def peak_rss_gb() -> float:
    """Peak resident set size of this process in GB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def cpu_model() -> str:
    """The CPU's model name (and its bf16 flags), for every figure printed."""
    name = platform.processor() or platform.machine()
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "?"
    return f"{name} ({os.cpu_count()} CPUs, {isa}, bf16: {', '.join(native) or 'none'})"


def machine_line() -> str:
    """``machine: <CPU model>; load <1, 5, 15 min>; torch <version>, <threads> threads``."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"machine: {cpu_model()}{gpu}; load {load}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5,
                  device: str = "cpu") -> float:
    """Best rate of an n x n x n matrix product in ``dtype`` on ``device``, in GFLOP/s."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _register_cpu_attention_flops() -> None:
    """Counts the CPU attention kernel: torch's FLOP counter knows the CUDA SDPA kernels but
    not ``_scaled_dot_product_flash_attention_for_cpu`` (nor its backward), so on a CPU it
    counted no attention at all (this project's earlier ceilings left it out)."""
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    registry = flop_counter.flop_registry
    if fwd is not None and fwd not in registry:
        @flop_counter.register_flop_formula(fwd)
        def _fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query, key, value)
    if bwd is not None and bwd not in registry:
        @flop_counter.register_flop_formula(bwd)
        def _bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


_register_cpu_attention_flops()


def count_flops(fn: Callable[[], None]) -> Dict[str, int]:
    """FLOPs of ``fn()`` (matrix products and attention, ``torch.utils.flop_counter``):
    ``{'total': n, 'attention': n}``."""
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts().get("Global", {})
    attention = sum(v for k, v in counts.items() if "attention" in str(k))
    return {"total": counter.get_total_flops(), "attention": attention}


def profile_table(fn: Callable[[], None], rows: int = 25, sort_by: str = "self_cpu_time_total",
                  repeats: int = 1) -> str:
    """``torch.profiler`` table of ``fn()`` run ``repeats`` times: the ops by self time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


def median_range(values) -> str:
    """``median (min-max)`` of a list of numbers."""
    v = sorted(values)
    mid = v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])
    return f"{mid:.3g} ({v[0]:.3g}-{v[-1]:.3g})"


def sync(device: Optional[torch.device]) -> None:
    """Waits for ``device`` (CUDA) so that a timer reads finished work."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
