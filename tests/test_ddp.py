"""Several processes (gloo on CPU): averaged gradients, a 2-process torchrun against one
process, an uneven last shard, a failing rank, and a batch the world size does not divide."""
import json
import os
import socket
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _parquet_util import TINY_MODEL_FLAGS, TINY_SCHEMA, tiny_table, write_dataset
from pcvr import checkpoint
import train
from pcvr.config import TrainConfig, parse_config
from pcvr.data.loaders import get_pcvr_data
from pcvr.distributed import GradientSync, World
from pcvr.errors import ConfigError
from pcvr.evaluation import predict, score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = TINY_MODEL_FLAGS + ["--batch_size", "16", "--valid_ratio", "0.2", "--num_epochs", "2",
                          "--lr", "0.003", "--seed", "3"]
TIMEOUT = 240  # a hang fails the test instead of the suite


def _sync_worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)  # the same weights on both ranks
    table = torch.nn.Embedding(50, 4, sparse=True)
    head = torch.nn.Linear(4, 1)
    ids = [torch.tensor([1, 2, 2, 7]), torch.tensor([7, 9, 30])]  # rank r's batch
    head(table(ids[rank])).sum().backward()
    GradientSync(list(head.parameters()), [table.weight])()
    torch.save({"table": table.weight.grad.to_dense(), "head": head.weight.grad}, out)
    dist.destroy_process_group()


def test_gradients_are_averaged_over_ranks_dense_and_sparse(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_sync_worker, args=(r, init, outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT)
        assert p.exitcode == 0
    torch.manual_seed(0)
    table, head = torch.nn.Embedding(50, 4), torch.nn.Linear(4, 1)
    for ids in (torch.tensor([1, 2, 2, 7]), torch.tensor([7, 9, 30])):
        head(table(ids)).sum().backward()  # the sum of both ranks' gradients
    got = [torch.load(o) for o in outs]
    for g in got:  # every rank holds the mean
        torch.testing.assert_close(g["table"], table.weight.grad / 2)
        torch.testing.assert_close(g["head"], head.weight.grad / 2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """11 row groups of 16 rows; the last ceil(0.2 * 176) = 36 rows validate, so training
    reads 8 whole groups and 12 rows of the ninth (ranks read 5 and 4 of these: an uneven
    last shard, after which the ranks' random streams differ, so the tables re-initialised
    after epoch 1 must be rank 0's on both)."""
    folder = tmp_path_factory.mktemp("ddp") / "data"
    write_dataset(str(folder), [tiny_table(range(176))], TINY_SCHEMA, rows_per_group=16)
    return folder


def torchrun(data, ckpt, *extra, nproc=2):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAIN_")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(ROOT, "train.py"), *RUN,
           "--data_dir", str(data), "--ckpt_dir", str(ckpt), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT)


def test_two_processes_train_like_one_and_score_all_validation_rows(data, tmp_path):
    one = torchrun(data, tmp_path / "one", nproc=1)
    two = torchrun(data, tmp_path / "two")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "drops its last 2 of 10 batches" in two.stderr  # the uneven shard, counted
    best = {}
    for name in ("one", "two"):
        best[name] = json.load(open(tmp_path / name / "best_checkpoint.json"))
    # The validation AUC of the 2-process run is that of its weights on every validation row:
    # one process scoring the saved checkpoint gets the same figure.
    ckpt = checkpoint.read(str(tmp_path / "two" / best["two"]["checkpoint"]))
    model, layout = checkpoint.load_model(ckpt)
    _, valid, _ = get_pcvr_data(str(data), layout, ckpt.cfg.data,
                                TrainConfig(batch_size=16, num_workers=0, valid_ratio=0.2))
    pred = predict(model, valid, torch.device("cpu"))
    assert pred.user_id.size == 36
    assert score(pred)["auc"] == pytest.approx(best["two"]["valid_auc"], abs=1e-9)
    # Different rows per step, the same global batch: close, not equal (tiny data: 36 rows).
    assert best["two"]["valid_auc"] == pytest.approx(best["one"]["valid_auc"], abs=0.15)
    # Only rank 0 writes: one checkpoint per epoch, each rank's progress in one log.
    assert len(checkpoint.list_checkpoints(str(tmp_path / "two"))) == 2
    assert two.stderr.count("validation epoch 2 step") == 1


def test_a_failing_rank_stops_the_others(data, tmp_path):
    bad = tmp_path / "bad"
    write_dataset(str(bad), [tiny_table(range(176))], TINY_SCHEMA, rows_per_group=16)
    path = str(bad / "part-0.parquet")
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(7).column(meta.schema.names.index("item_int_feats_5"))
    with open(path, "r+b") as fh:  # one rank's row group no longer decodes
        fh.seek(col.data_page_offset)
        fh.write(b"\xff" * 24)
    proc = torchrun(bad, tmp_path / "ck", "--num_epochs", "1")
    assert proc.returncode != 0
    assert "row group 7: cannot decode column 'item_int_feats_5'" in proc.stderr


def test_a_batch_the_world_size_does_not_divide_is_refused(data, tmp_path):
    cfg = parse_config(RUN + ["--data_dir", str(data), "--ckpt_dir", str(tmp_path / "ck"),
                              "--batch_size", "15"], environ={})
    with pytest.raises(ConfigError, match="--batch_size 15 is the global batch: it must be a "
                                          "multiple of the 2 processes"):
        train.run(cfg, World(rank=0, size=2), torch.device("cpu"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_train_exactly_like_two_processes_of_one(data, tmp_path):
    """The multi-machine launch (--nnodes 2, c10d rendezvous), both "machines" here."""
    endpoint = f"127.0.0.1:{free_port()}"
    # One thread per process, as torchrun sets for several processes on one machine: the
    # same arithmetic, so the same bits.
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("TRAIN_")},
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
         "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
         "--rdzv_id=pcvr-test", os.path.join(ROOT, "train.py"), *RUN, "--data_dir", str(data),
         "--ckpt_dir", str(tmp_path / f"node{node}")], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True) for node in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err[-3000:]
    one_machine = torchrun(data, tmp_path / "standalone")
    assert one_machine.returncode == 0, one_machine.stderr[-3000:]
    first = "global_step8.epoch1.layer=1.head=2.hidden=16"
    written = [n for n in (0, 1) if os.path.isdir(tmp_path / f"node{n}" / first)]
    assert len(written) == 1  # the rank 0 machine only
    for name in ("global_step8.epoch1.layer=1.head=2.hidden=16",
                 "global_step16.epoch2.layer=1.head=2.hidden=16"):
        a = torch.load(tmp_path / f"node{written[0]}" / name / "model.pt")
        b = torch.load(tmp_path / "standalone" / name / "model.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
