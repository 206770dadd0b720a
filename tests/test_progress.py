"""Progress a user can read: totals counted from the parquet footers, and log lines with the
same figures as the bar when the log is not a terminal."""
import logging

from pcvr.progress import Progress, fmt_seconds


def test_a_log_gets_lines_with_steps_rate_and_time_left(caplog):
    progress = Progress(range(4), "epoch 1/3", total=4, rows_per_item=8,
                        run_left=lambda: 8, status=lambda: {"loss": "0.5"}, terminal=False,
                        log_every=0.0)
    with caplog.at_level(logging.INFO):
        assert list(progress) == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and lines[-1].startswith("epoch 1/3: steps 4/4, it/s ")
    for key in ("samples/s", "left 0:00:00", "run left", "loss 0.5"):
        assert key in lines[-1], key


def test_time_formatting():
    assert fmt_seconds(3725.4) == "1:02:05" and fmt_seconds(float("nan")) == "?"


def test_loaders_know_their_batches_before_the_first(tmp_path):
    from _parquet_util import TINY_SCHEMA, TINY_SEQ_MAX_LENS, tiny_table, write_dataset
    from pcvr.config import DataConfig, TrainConfig, parse_seq_max_lens
    from pcvr.data.loaders import get_pcvr_data
    from pcvr.schema import parse_schema
    write_dataset(str(tmp_path), [tiny_table(range(24)), tiny_table(range(24, 57))],
                  TINY_SCHEMA, rows_per_group=6)
    layout = parse_schema(TINY_SCHEMA, parse_seq_max_lens(TINY_SEQ_MAX_LENS), True)
    for workers, pool in ((0, 0), (0, 2), (2, 2)):
        train, valid, _ = get_pcvr_data(
            str(tmp_path), layout, DataConfig(seq_max_lens=TINY_SEQ_MAX_LENS),
            TrainConfig(batch_size=4, num_workers=workers, buffer_batches=pool,
                        valid_ratio=0.2))
        for epoch in (1, 2):
            train.set_epoch(epoch)
            assert train.num_batches == sum(1 for _ in train)
        assert valid.num_batches == sum(1 for _ in valid)
