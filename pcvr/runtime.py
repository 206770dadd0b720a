"""The process around a run: logging, seeding, the device, and how fast it runs there: the
CPU threads (``configure_threads``), the training precision (``choose_train_precision``) and
the training forward (``training_forward``: compiled or not, fixed shapes or not).

Importing this module before torch sets OpenMP's passive wait policy (see
``PASSIVE_WAIT_NOTE``); entry points import it first.
"""
from __future__ import annotations

import os

# OpenMP threads that wait at the end of a parallel region spin for ~300,000 iterations
# before they sleep (libgomp's default). When two processes share the cores (two trainings,
# a training beside the DataLoader workers or a test run), each one's spinning threads take
# the cores the other's working threads need: measured here (2-core AMD EPYC, two other
# busy processes) a training step took 14.5 s with spinning and 1.9 s with passive waiting.
# libgomp reads the policy once, when torch loads it, so it is set before the first
# ``import torch``; a value set by the user wins.
PASSIVE_WAIT_NOTE = "OMP_WAIT_POLICY=PASSIVE unless set (module comment)"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Iterable, List, Optional, Set, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger(__name__)


class LogFormatter(logging.Formatter):
    """``<date time> - H:MM:SS elapsed - message``, continuation lines indented under it."""

    def __init__(self) -> None:
        super().__init__()
        self.start_time = time.time()

    def format(self, record: logging.LogRecord) -> str:
        elapsed = int(record.created - self.start_time)
        prefix = "%s - %d:%02d:%02d - " % (time.strftime("%x %X", time.localtime(record.created)),
                                           elapsed // 3600, elapsed // 60 % 60, elapsed % 60)
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return prefix + message.replace("\n", "\n" + " " * len(prefix))


def create_logger(path: Optional[str] = None, quiet: bool = False) -> logging.Logger:
    """Root logger to stderr (INFO; WARNING when ``quiet``, e.g. ranks other than 0) and, if
    ``path`` is given, to that file (DEBUG).

    Replaces the handlers of an earlier call (a second run in one process logs to its own
    file) and leaves everyone else's, e.g. a test harness's, in place.
    """
    formatter = LogFormatter()
    logger = logging.getLogger()
    for old in [h for h in logger.handlers if getattr(h, "pcvr_owned", False)]:
        logger.removeHandler(old)
        old.close()
    logger.setLevel(logging.DEBUG)
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setLevel(logging.WARNING if quiet else logging.INFO)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w"))
        handlers[1].setLevel(logging.DEBUG)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.pcvr_owned = True
        logger.addHandler(handler)
    return logger


def set_seed(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def count_params(params: Iterable[torch.nn.Parameter]) -> int:
    """Number of elements of ``params``."""
    return sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- threads

def cgroup_cpu_limit(proc_cgroup: str = "/proc/self/cgroup",
                     root: str = "/sys/fs/cgroup") -> Optional[float]:
    """The CPU quota of this process's cgroups in cores (``quota / period``), or None.

    cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); every
    ancestor of the process's cgroup is read, the smallest quota wins (a quota set on a parent
    holds for its children); with a cgroup namespace the process's own folder is the mount's
    root, which is read too. None where nothing is limited or nothing can be read.
    """
    try:
        with open(proc_cgroup, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    limits: List[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2
            mounts = [root, os.path.join(root, "unified")]
            files: Tuple[str, ...] = ("cpu.max",)
        elif "cpu" in controllers.split(","):  # v1
            mounts = [os.path.join(root, controllers), os.path.join(root, "cpu"),
                      os.path.join(root, "cpu,cpuacct")]
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        rel = path.strip("/").split("/") if path.strip("/") else []
        for mount in dict.fromkeys(mounts):
            for depth in range(len(rel), -1, -1):
                limit = _read_quota(os.path.join(mount, *rel[:depth]), files)
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def _read_quota(folder: str, files: Tuple[str, ...]) -> Optional[float]:
    try:
        texts = []
        for name in files:
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                texts.append(fh.read().split())
    except OSError:
        return None
    try:
        if len(files) == 1:  # v2: "max 100000" or "200000 100000"
            quota, period = texts[0][0], texts[0][1]
        else:  # v1: quota (-1 = none), period
            quota, period = texts[0][0], texts[1][0]
        if quota in ("max", "-1") or float(period) <= 0:
            return None
        return float(quota) / float(period)
    except (IndexError, ValueError):
        return None


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by its cgroup CPU quota
    (rounded down, at least 1: a thread over the quota is throttled mid-region and stalls
    every other thread at the region's end)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


# A DataLoader worker of a CPU training needs about this share of a core: converting a batch
# costs ~1/40 of its training step here (2,700 rows/s per core against 70 rows/s of
# training on 2 cores), rounded up for machines where the model runs relatively faster.
CPU_RUN_WORKER_SHARE = 1.0 / 16


def plan_threads(cpus: int, num_workers: int, accelerator: bool) -> int:
    """Intra-op threads of the main process, given ``cpus`` usable CPUs and the workers.

    With an accelerator the model's arithmetic runs there and the CPU's work is the
    conversion, so each worker keeps a core and the main process (which only launches
    kernels) takes what is left, at least 1. On the CPU the model's step is the work and a
    worker needs only ``CPU_RUN_WORKER_SHARE`` of a core, so the workers keep
    ``round(num_workers * share)`` cores together (none for up to 8 workers).
    """
    workers = max(0, num_workers)
    if accelerator:
        reserved = workers
    else:
        reserved = int(math.floor(workers * CPU_RUN_WORKER_SHARE + 0.5))
    return max(1, min(cpus, cpus - reserved))


def configure_threads(num_workers: int, device: torch.device) -> int:
    """Sets torch's intra-op threads by ``plan_threads``; returns them.

    The usable CPUs (``available_cpus``) are shared by the processes of one machine
    (``LOCAL_WORLD_SIZE``, set by torchrun); an ``OMP_NUM_THREADS`` given by the user (or by
    torchrun) is kept as it is. DataLoader workers set their own threads to 1 (torch does),
    so they do not multiply this.
    """
    cpus = available_cpus()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if os.environ.get("OMP_NUM_THREADS"):
        threads, why = torch.get_num_threads(), "OMP_NUM_THREADS is set"
    else:
        threads = plan_threads(max(1, cpus // local), num_workers, device.type != "cpu")
        torch.set_num_threads(threads)
        why = f"{local} process(es) on this machine" if local > 1 else "this process"
    log.info("threads: %d intra-op (%s) of %d usable CPU(s) (affinity and cgroup quota), %d "
             "DataLoader worker(s), device %s; OMP_WAIT_POLICY=%s", threads, why, cpus,
             num_workers, device.type, os.environ.get("OMP_WAIT_POLICY", "(libgomp default)"))
    return threads


# ----------------------------------------------------------------------------- precision

def cpu_flags(path: str = "/proc/cpuinfo") -> Set[str]:
    """The CPU's feature flags (``flags`` of /proc/cpuinfo, x86 Linux); else what torch's
    cpuinfo reports for the two that matter here; empty when neither can tell."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    flags = set()
    for name, check in (("avx512_bf16", "_is_avx512_bf16_supported"),
                        ("amx_bf16", "_is_amx_tile_supported")):
        fn = getattr(torch.cpu, check, None)
        try:
            if fn is not None and fn():
                flags.add(name)
        except Exception:  # noqa: BLE001 - a private probe; absent means unknown
            pass
    return flags


# oneDNN ISA levels (ONEDNN_MAX_CPU_ISA values) at which its bf16 products are native.
ONEDNN_BF16_ISAS = frozenset({
    "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX",
    "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT"})


def onednn_isa_cap() -> Optional[str]:
    """The ISA a user capped oneDNN at (``ONEDNN_MAX_CPU_ISA``, or its older name
    ``DNNL_MAX_CPU_ISA``), upper-cased; None when oneDNN may use the whole CPU."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip()
        if value:
            return value.upper()
    return None


def native_bf16(device: torch.device) -> Tuple[bool, str]:
    """Whether ``device`` runs bfloat16 matrix products natively (fast), and why.

    The rule detects the capability; it does not time a product. A measurement at start-up
    would cost seconds, time a matrix product rather than the training step, and, on a
    shared machine, flip between runs of the same job (this 2-core VM's float32 product rate
    moves by 2x between busy and quiet spells), so that one job trains in bf16 and its rerun
    in float32. The capability is what separates the two cases that matter: with AVX512-BF16
    or AMX instructions oneDNN's bf16 products run ~5x faster than float32 (AMD EPYC here);
    without them they are emulated, 60x slower (an AVX2 EPYC). ``bench_train.py`` times both
    dtypes' products on every run, so a wrong call would show there.

    CUDA: compute capability >= 8.0 (Ampere and later; earlier GPUs emulate bf16).
    CPU: the AVX512-BF16 or AMX-BF16 flag, a torch build with oneDNN, and no
    ``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16 (that cap makes oneDNN emulate bf16 on a
    CPU that has it: 1.8 against 76 GFLOP/s of float32 here with ``AVX2``).
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return True, f"{name} (compute capability {major}.{minor}) runs bf16 natively"
        return False, (f"{name} has compute capability {major}.{minor}; native bf16 needs "
                       f">= 8.0, earlier GPUs emulate it")
    if device.type == "cpu":
        flags = cpu_flags()
        found = sorted(flags & {"avx512_bf16", "amx_bf16"})
        cap = onednn_isa_cap()
        if found and cap is not None and cap not in ONEDNN_BF16_ISAS:
            return False, (f"this CPU has {found[0]} but ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN "
                           f"from it: bf16 matrix products are emulated, far slower than "
                           f"float32")
        if found and torch.backends.mkldnn.is_available():
            return True, f"this CPU has {' and '.join(found)}: oneDNN runs bf16 natively"
        if found:
            return False, f"this CPU has {found[0]} but torch was built without oneDNN"
        return False, ("this CPU has neither AVX512-BF16 nor AMX-BF16: its bf16 matrix "
                       "products are emulated, far slower than float32")
    return False, f"bf16 is not known to be fast on device type {device.type!r}"


def choose_train_precision(requested: str, use_bf16_train: bool, device: torch.device
                           ) -> Tuple[str, str]:
    """The training precision, ``'bf16'`` (bf16 autocast) or ``'float32'``, and why.

    ``requested`` (``--train_precision``): ``'bf16'`` or ``'float32'`` force that precision;
    ``'auto'`` trains in bf16 when ``use_bf16_train`` (``--use_bf16_train``: "bf16 where this
    device runs it fast") and ``native_bf16(device)``, else in float32.
    """
    if requested in ("bf16", "float32"):
        reason = f"forced by --train_precision {requested}"
        if requested == "bf16":
            fast, why = native_bf16(device)
            if not fast:
                reason += f" (slow here: {why})"
        return requested, reason
    if requested != "auto":
        raise ValueError(f"train_precision must be auto, bf16 or float32, got {requested!r}")
    if not use_bf16_train:
        return "float32", "--use_bf16_train is off"
    fast, why = native_bf16(device)
    if fast:
        return "bf16", f"--use_bf16_train and {why}"
    return "float32", f"--use_bf16_train asks for bf16 where it is fast, but {why}"


# ----------------------------------------------------------------------------- the forward

def step_is_sync_free(device: torch.device, compiled: bool) -> bool:
    """Whether the train step takes the fixed-shape path (no host read, no data-dependent
    shape): on every accelerator, where a host read stalls the device queue, and under
    ``torch.compile``, which needs static shapes. The CPU's eager step keeps its host-planned
    tricks (length buckets, sparse table gradients, the sparse dropout draw): there the host
    read costs nothing."""
    return compiled or device.type != "cpu"


def training_forward(model: torch.nn.Module, device: torch.device, compile: bool = False,
                     seq_pad_multiple: int = 0) -> Callable[[Any], Any]:
    """The callable the trainer runs a batch through: the model, optionally compiled, with
    the batch's histories optionally padded to fixed shapes first.

    On the fixed-shape path (``step_is_sync_free``) the embedding tables get dense gradients
    (``set_sparse_grads(False)`` where the model has it): the sparse gradient of a table with
    a padding row drops the padding ids with a data-dependent ``nonzero`` (a host sync), and
    ``torch.compile`` cannot trace it. Adagrad's update is the same either way.

    Args:
        model: the model (``pad_batch(batch, multiple)`` and ``set_sparse_grads(enabled)``
            are used when it has them).
        device: the training device.
        compile: ``torch.compile`` the model (inductor; default dynamic-shape policy).
        seq_pad_multiple: > 0 pads every history length up to a multiple of it (capped at
            the domain's maximum), so that a compiled model sees a few shapes, not one per
            batch; 0 = as the batch comes.
    """
    set_sparse = getattr(model, "set_sparse_grads", None)
    if set_sparse is not None:
        set_sparse(not step_is_sync_free(device, compile))
    fn: Callable[[Any], Any] = torch.compile(model) if compile else model
    pad = getattr(model, "pad_batch", None)
    if seq_pad_multiple > 0 and pad is not None:
        return lambda batch: fn(pad(batch, seq_pad_multiple))
    return fn
