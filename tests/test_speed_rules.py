"""Issue 13: the per-device rules (training precision, threads) and the fixed-shape, sync-free
training step (``pcvr/runtime.py``), on mocked capabilities and tiny models."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

from pcvr import runtime
from pcvr.config import (TrainConfig, from_flat_dict, parse_config,
                         to_flat_dict)
from pcvr.model.outputs import ModelOutput
from pcvr.model.tokens import DENSE_GRAD_MAX_ROWS
from pcvr.training.losses import training_loss
from pcvr.training.trainer import Trainer
from test_model import make_batch, make_cfg, make_model

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- precision

@pytest.fixture
def cpu_bf16(monkeypatch):
    """Mocks the CPU's flags: ``cpu_bf16(True)`` has AVX512-BF16, ``(False)`` only AVX2."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)

    def set_native(native: bool) -> None:
        flags = {"avx2", "fma"} | ({"avx512f", "avx512_bf16"} if native else set())
        monkeypatch.setattr(runtime, "cpu_flags", lambda path="/proc/cpuinfo": set(flags))
    return set_native


def test_auto_precision_follows_the_cpu_capability(cpu_bf16):
    cpu_bf16(True)
    assert runtime.choose_train_precision("auto", True, CPU)[0] == "bf16"
    cpu_bf16(False)
    precision, why = runtime.choose_train_precision("auto", True, CPU)
    assert precision == "float32" and "neither AVX512-BF16 nor AMX" in why
    # --use_bf16_train off: float32 everywhere, however fast bf16 would be.
    cpu_bf16(True)
    assert runtime.choose_train_precision("auto", False, CPU) == (
        "float32", "--use_bf16_train is off")


def test_a_onednn_isa_cap_below_bf16_counts_as_no_bf16(cpu_bf16, monkeypatch):
    cpu_bf16(True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    precision, why = runtime.choose_train_precision("auto", True, CPU)
    assert precision == "float32" and "ONEDNN_MAX_CPU_ISA=AVX2" in why
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert runtime.choose_train_precision("auto", True, CPU)[0] == "bf16"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")
    assert runtime.choose_train_precision("auto", True, CPU)[0] == "float32"


def test_forced_precision_wins_both_ways(cpu_bf16):
    cpu_bf16(False)
    precision, why = runtime.choose_train_precision("bf16", False, CPU)
    assert precision == "bf16" and "forced" in why and "slow here" in why
    cpu_bf16(True)
    assert runtime.choose_train_precision("float32", True, CPU)[0] == "float32"
    with pytest.raises(ValueError, match="train_precision"):
        runtime.choose_train_precision("fp16", True, CPU)


def test_cuda_bf16_needs_compute_capability_8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda", 0)
    assert runtime.choose_train_precision("auto", True, cuda)[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    precision, why = runtime.choose_train_precision("auto", True, cuda)
    assert precision == "float32" and "7.5" in why
    assert runtime.choose_train_precision("auto", True, torch.device("mps"))[0] == "float32"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n")
    assert {"avx512_bf16", "amx_bf16"} <= runtime.cpu_flags(str(info))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 1)

    def sparse_parameters(self):
        return []

    def dense_parameters(self):
        return list(self.head.parameters())

    def forward(self, batch):
        return ModelOutput(self.head(batch), {}, None)


@pytest.mark.parametrize("native", [True, False])
def test_trainer_records_the_precision_it_uses(native, cpu_bf16, caplog):
    cpu_bf16(native)
    cfg = parse_config(["--preset", "seed"], environ={})  # the seed asks for bf16
    assert cfg.train.use_bf16_train and cfg.train.train_precision == "auto"
    with caplog.at_level(logging.INFO):
        trainer = Trainer(_Tiny(), cfg, [], None, CPU)
    want = "bf16" if native else "float32"
    assert trainer.use_bf16 == native and cfg.train.train_precision == want
    assert [r for r in caplog.records if r.getMessage().startswith(f"training precision: {want}")]
    # train_config.json holds the precision used; it reads back strictly, and a config
    # written before the flag existed (no key) still reads.
    flat = to_flat_dict(cfg)
    assert flat["train_precision"] == want
    assert from_flat_dict(flat).train.train_precision == want
    del flat["train_precision"], flat["compile"], flat["seq_pad_multiple"]
    assert from_flat_dict(flat).train.train_precision == "auto"


# ----------------------------------------------------------------------------- threads

def test_threads_divided_with_the_workers():
    # On the CPU the model's step is the work: a few workers keep no core.
    assert runtime.plan_threads(2, 2, accelerator=False) == 2
    assert runtime.plan_threads(16, 8, accelerator=False) == 15
    # With an accelerator the CPU's work is the conversion: each worker keeps a core.
    assert runtime.plan_threads(9, 8, accelerator=True) == 1
    assert runtime.plan_threads(16, 4, accelerator=True) == 12
    assert runtime.plan_threads(1, 8, accelerator=False) == 1


def _cgroup(tmp_path, proc_line, files):
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line + "\n")
    for rel, text in files.items():
        path = tmp_path / "fs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(proc), str(tmp_path / "fs")


def test_cgroup_quota_v2_and_v1(tmp_path):
    proc, root = _cgroup(tmp_path / "v2", "0::/job/step",
                         {"job/step/cpu.max": "max 100000\n", "job/cpu.max": "450000 100000\n"})
    assert runtime.cgroup_cpu_limit(proc, root) == 4.5  # the parent's quota holds
    proc, root = _cgroup(tmp_path / "v1", "3:cpu,cpuacct:/docker/abc",
                         {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "900000\n",
                          "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert runtime.cgroup_cpu_limit(proc, root) == 9.0
    proc, root = _cgroup(tmp_path / "none", "1:cpu:/",
                         {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert runtime.cgroup_cpu_limit(proc, root) is None
    assert runtime.cgroup_cpu_limit(str(tmp_path / "missing"), root) is None


def test_configure_threads_caps_by_affinity_and_quota(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: 3.5)
    try:
        assert runtime.available_cpus() == 3
        assert runtime.configure_threads(0, CPU) == 3 == torch.get_num_threads()
        assert runtime.configure_threads(8, torch.device("cuda")) == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun: 3 processes share the CPUs
        assert runtime.configure_threads(0, CPU) == 1
    finally:
        torch.set_num_threads(before)


def test_openmp_waits_passively_unless_told_otherwise():
    assert os.environ.get("OMP_WAIT_POLICY")  # set by importing pcvr.runtime first


# ----------------------------------------------------------------------------- the step

def _tiny_hyformer(**kw):
    cfg = make_cfg(use_pair_62_66=True, use_abs_time_emb=True, action_num=1, **kw)
    return make_model(cfg)


def test_forward_and_loss_compile_as_one_graph():
    """No host sync in the training forward and loss: ``fullgraph=True`` fails on any
    ``.item()``, ``nonzero`` or data-dependent shape (forward and, through aot_autograd,
    backward), so the fixed-shape path is proven on the CPU."""
    import torch._dynamo
    torch._dynamo.reset()
    model = _tiny_hyformer(dropout_rate=0.1, num_hyformer_blocks=1).train()
    runtime.training_forward(model, CPU, compile=False)
    tables = [m for m in model.modules()
              if isinstance(m, nn.Embedding) and m.num_embeddings > DENSE_GRAD_MAX_ROWS]
    assert tables and all(t.sparse for t in tables)  # the CPU's eager step: sparse
    runtime.training_forward(model, CPU, compile=True)  # the fixed-shape path: dense
    assert not any(t.sparse for t in tables)
    tc = TrainConfig()

    def step(batch):
        return training_loss(model(batch), batch.label.float(), tc)[0]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    batch = model.pad_batch(make_batch(batch=8), 4)
    compiled(batch).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.is_sparse for g in grads)


def test_fixed_shapes_give_the_same_outputs():
    """Padded histories (any multiple) and the single-bucket path predict what the
    bucketed, trimmed path does."""
    model = _tiny_hyformer().eval()
    batch = make_batch(batch=16, seed=3)
    want = model.predict(batch)
    for multiple in (3, 100):
        padded = model.pad_batch(batch, multiple)
        for name, s in padded.seq.items():
            length = s.ids.shape[-1]
            assert length == min(model.seq.max_lens[name],
                                 -(-batch.seq[name].ids.shape[-1] // multiple) * multiple)
            assert s.time_bucket.shape[-1] == length
            assert torch.equal(s.lens, batch.seq[name].lens)
        torch.testing.assert_close(model.predict(padded), want, rtol=0, atol=1e-5)
    model.seq.max_seq_buckets = 1
    torch.testing.assert_close(model.predict(model.pad_batch(batch, 100)), want, rtol=0,
                               atol=1e-5)


def test_dense_adamw_is_fused_where_torch_has_it():
    from pcvr.training.optim import dense_adamw
    opt = dense_adamw([nn.Parameter(torch.zeros(3))], TrainConfig())
    assert opt.defaults.get("fused") in (True, None)  # None: an older torch without it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_train_step_has_no_host_sync():
    """On a GPU: bf16 train steps of the tiny model raise on any synchronising call."""
    device = torch.device("cuda")
    model = _tiny_hyformer(dropout_rate=0.1).to(device)
    cfg = parse_config(["--use_bf16_train", "--batch_size", "8", "--grad_clip", "1",
                        "--ema_decay", "0.9"], environ={})
    trainer = Trainer(model, cfg, [], None, device)
    assert cfg.train.train_precision == "bf16" or torch.cuda.get_device_capability()[0] < 8
    from pcvr.training.ema import ModelEMA
    trainer.ema = ModelEMA(model, 0.9)
    batches = [make_batch(batch=8, seed=s).pin_memory().to(device, non_blocking=True)
               for s in range(3)]
    trainer.train_step(batches[0])  # optimiser state is created on the first step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:
            parts = trainer.train_step(b)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(parts["loss/total"]).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inference_matches_the_cpu():
    """Float32 predictions on the GPU (one length bucket, CUDA attention kernels) agree with
    the CPU's (length buckets), from pinned batches moved without blocking."""
    model = _tiny_hyformer().eval()
    batch = make_batch(batch=16, seed=5)
    want = model.predict(batch)
    got = model.to("cuda").predict(batch.pin_memory().to("cuda", non_blocking=True))
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-4)
