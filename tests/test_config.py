"""One declaration per flag: CLI, train_config.json and the strict rebuild agree."""
import dataclasses
import os
import shlex

import pytest

import pcvr.config as config
from pcvr.config import (ConfigError, DataConfig, DecouplingConfig, ModelConfig,
                         TrainConfig, from_flat_dict, parse_config, parse_seq_max_lens,
                         to_flat_dict)

REFERENCE_FLAGS = """data_dir schema_path ckpt_dir log_dir batch_size lr num_epochs patience seed
device num_workers buffer_batches train_ratio valid_ratio eval_every_n_steps seq_max_lens
use_user_activity_dense d_model emb_dim num_queries num_hyformer_blocks num_heads
seq_encoder_type hidden_mult dropout_rate seq_top_k seq_causal action_num use_time_buckets
rank_mixer_mode use_rope rope_base use_abs_time_emb time_zone_offset_hours
user_abs_time_missing_as_padding add_user_time_to_dense_tok use_pair_62_66
use_dense_cross_token dense_cross_user_fids dense_cross_item_source dense_cross_item_fids
dense_cross_dim use_target_attention use_ns_se_gate use_ns_self_attn ns_self_attn_impl
ns_autoint_layers ns_autoint_heads ns_autoint_gate_init ns_autoint_activation
use_combined_autoint combined_autoint_layers combined_autoint_heads combined_autoint_dropout
combined_autoint_gate_init combined_autoint_position head_cross_layers head_cross_init_scale
use_bf16_train inference_dtype experiment_name loss_type focal_alpha focal_gamma sparse_lr
sparse_weight_decay reinit_sparse_after_epoch reinit_cardinality_threshold ema_decay
ema_start_epoch emb_skip_threshold seq_id_threshold ns_groups_json ns_tokenizer_type
user_ns_tokens item_ns_tokens randomized_split randomized_split_seed""".split()


def test_every_reference_flag_is_accepted():
    parser = config.build_parser()
    options = {s for a in parser._actions for s in a.option_strings}
    missing = [f for f in REFERENCE_FLAGS if f"--{f}" not in options]
    assert not missing
    assert {"--no_time_buckets", "--no_user_activity_dense"} <= options


def test_seed_command_line_parses():
    cfg = parse_config(shlex.split("""--experiment_name x --ns_tokenizer_type rankmixer
        --user_ns_tokens 5 --item_ns_tokens 2 --num_queries 2 --ns_groups_json ""
        --emb_skip_threshold 1000000 --num_workers 8 --use_time_buckets --use_abs_time_emb
        --time_zone_offset_hours 8 --use_user_activity_dense --use_pair_62_66 --use_bf16_train
        --inference_dtype float32"""), environ={})
    assert cfg.model.use_abs_time_emb and cfg.model.use_pair_62_66 and cfg.train.use_bf16_train
    assert cfg.model.ns_groups_json == "" and cfg.data.time_zone_offset_hours == 8
    assert parse_config(["--no_time_buckets"], environ={}).model.use_time_buckets is False


def test_the_seed_preset_is_the_seed_command_line_and_explicit_flags_win():
    seed_cli = parse_config(shlex.split("""--experiment_name
        sota_activity_dense_utc8_pair6266_bf16train_fp32infer --ns_tokenizer_type rankmixer
        --user_ns_tokens 5 --item_ns_tokens 2 --num_queries 2 --ns_groups_json ""
        --emb_skip_threshold 1000000 --num_workers 8 --use_time_buckets --use_abs_time_emb
        --time_zone_offset_hours 8 --use_user_activity_dense --use_pair_62_66 --use_bf16_train
        --inference_dtype float32"""), environ={})
    preset = parse_config(["--preset", "seed"], environ={})
    assert dataclasses.replace(preset.train, preset="") == seed_cli.train
    assert (preset.model, preset.data) == (seed_cli.model, seed_cli.data)
    mixed = parse_config(["--no_pair_62_66", "--preset", "seed", "--num_workers", "2"],
                         environ={})
    assert not mixed.model.use_pair_62_66 and mixed.train.num_workers == 2
    assert mixed.model.use_abs_time_emb and mixed.train.preset == "seed"
    base = parse_config(["--preset", "baseline"], environ={})
    assert not (base.model.use_abs_time_emb or base.model.use_pair_62_66
                or base.train.use_bf16_train or base.data.use_user_activity_dense)


def test_every_help_text_is_printable():
    config.build_parser((config.InferConfig,)).format_help()
    assert "d_model % num_heads" in config.build_parser().format_help()  # '%' is escaped


def test_env_overrides_cli():
    env = {"TRAIN_DATA_PATH": "/d", "TRAIN_CKPT_PATH": "/c", "TRAIN_LOG_PATH": "/l",
           "TRAIN_TF_EVENTS_PATH": "/e"}
    cfg = parse_config(["--data_dir", "/x", "--ckpt_dir", "/y"], environ=env)
    t = cfg.train
    assert (t.data_dir, t.ckpt_dir, t.log_dir, t.tf_events_dir) == ("/d", "/c", "/l", "/e")


def test_round_trip_and_strictness():
    cfg = parse_config(["--d_model", "32", "--ns_self_attn_impl", "autoint",
                        "--ns_autoint_layers", "3"], environ={})
    flat = to_flat_dict(cfg)
    again = from_flat_dict(dict(flat, num_time_buckets=64), derived=["num_time_buckets"])
    assert again.model == cfg.model and again.data == cfg.data
    assert again.decoupling == cfg.decoupling
    for section in (DataConfig, ModelConfig, DecouplingConfig):
        name = dataclasses.fields(section)[0].name
        broken = dict(flat)
        del broken[name]
        with pytest.raises(ConfigError, match=f"missing key '{name}'"):
            from_flat_dict(broken)
    with pytest.raises(ConfigError, match="unknown key"):
        from_flat_dict(dict(flat, some_future_flag=1))
    # Training-only keys may be absent: the model can still be rebuilt.
    partial = {k: v for k, v in flat.items()
               if k not in {f.name for f in dataclasses.fields(TrainConfig)}}
    assert from_flat_dict(partial).model == cfg.model


def test_parse_seq_max_lens():
    assert parse_seq_max_lens("seq_a:3, seq_b:4") == {"seq_a": 3, "seq_b": 4}
    for bad in ("seq_a", "seq_a:x", "seq_a:0", ":3"):
        with pytest.raises(ValueError, match="seq_max_lens"):
            parse_seq_max_lens(bad)


def test_readme_documents_every_flag():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "README.md"), encoding="utf-8").read()
    for cls in config.SECTIONS:
        for f in dataclasses.fields(cls):
            assert f"`--{f.name}`" in readme, f"README.md lacks --{f.name} (scripts/flags_md.py)"
