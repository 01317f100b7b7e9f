"""random-LTD flags + DeepSpeed JSON -> RandomLTDConfig; shipped example configs; bad input."""

import copy
import json
import os

import pytest

from megatron.arguments import build_parser
from megatron.errors import UserError
from megatron.ltd.config import DS_PATH, add_random_ltd_args, random_ltd_config_from_args
from megatron.ltd.schedule import RandomLTDScheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "deepspeed_configs")
GPT13B = os.path.join(EXAMPLES, "ds_config_gpt3_1.3B_random_ltd.json")
GPT350M = os.path.join(EXAMPLES, "ds_config_gpt3_350M_random_ltd.json")
BERT = os.path.join(EXAMPLES, "ds_config_bert_large_random_ltd.json")


def _parser():
    parser = build_parser()
    if "--random-ltd" not in parser._option_string_actions:
        add_random_ltd_args(parser)
    return parser


def cfg_of(argv):
    return random_ltd_config_from_args(_parser().parse_args(argv))


def gpt(*extra, layers=24, seq=2048):
    return ["--num-layers", str(layers), "--seq-length", str(seq), *extra]


def write_json(tmp_path, data, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def ds_with(tmp_path, edit):
    """The shipped 1.3B config with ``edit(section)`` applied to its random_ltd section."""
    with open(GPT13B) as f:
        data = json.load(f)
    edit(data["data_efficiency"]["data_routing"]["random_ltd"])
    return write_json(tmp_path, data)


# -- shipped examples ---------------------------------------------------------------------------


def test_shipped_gpt3_1p3b_config():
    for flag in ("--deepspeed_config", "--deepspeed-config"):
        cfg = cfg_of(gpt("--random-ltd", flag, GPT13B))
        assert cfg.enabled and cfg.method == "random"
        assert cfg.layer_ids == tuple(range(1, 23))
        assert (cfg.start, cfg.step, cfg.schedule_steps, cfg.schedule_tokens) == (
            128, 16, 200000, None)
        assert cfg.schedule == "fixed_linear" and cfg.root_degree == 1.0
        assert (cfg.model_type, cfg.hidden_state_order, cfg.model_mask_name) == (
            "decoder", "seq_batch_dim", "attention_mask")
        assert cfg.deepspeed_config == GPT13B and not cfg.layer_token_lr
    sched = RandomLTDScheduler.from_config(cfg, 24, 2048)
    assert sched.kept_lengths(1666) == {i: 128 for i in range(1, 23)}
    assert sched.kept_lengths(1667)[1] == 144
    assert sched.kept_lengths(100000)[22] == 1088
    assert sched.kept_lengths(200000) == {}


def test_shipped_350m_and_bert_configs():
    cfg = cfg_of(gpt("--random-ltd", "--deepspeed_config", GPT350M))
    assert (cfg.start, cfg.schedule_steps, cfg.seq_length) == (128, 400000, 2048)
    cfg = cfg_of(gpt("--random-ltd", "--deepspeed_config", BERT, seq=512))
    assert (cfg.start, cfg.schedule_steps, cfg.seq_length, cfg.model_type) == (
        128, 2000000, 512, "encoder")
    assert cfg.layer_ids == tuple(range(1, 23))


def test_json_train_batch_size_must_agree_with_the_global_batch():
    cfg = cfg_of(gpt("--random-ltd", "--deepspeed_config", GPT13B, "--global-batch-size", "512"))
    assert cfg.enabled
    with pytest.raises(UserError, match=r"--global-batch-size 256 contradicts --deepspeed-config "
                                        r".*train_batch_size = 512"):
        cfg_of(gpt("--random-ltd", "--deepspeed_config", GPT13B, "--global-batch-size", "256"))


def test_json_alone_enables_like_deepspeed():
    cfg = cfg_of(gpt("--deepspeed_config", GPT13B))
    assert cfg is not None and cfg.enabled


def test_inactive_section_is_ignored(tmp_path):
    # Megatron-DeepSpeed's baseline configs: section disabled, placeholder values.
    def baseline(sec):
        sec["enabled"] = False
        sec["random_ltd_schedule"]["min_value"] = 2048
        sec["random_ltd_schedule"]["schedule_config"]["require_steps"] = 1
    path = ds_with(tmp_path, baseline)
    assert cfg_of(gpt("--deepspeed_config", path)) is None
    with pytest.raises(UserError) as err:
        cfg_of(gpt("--random-ltd", "--deepspeed_config", path))
    assert "--random-ltd" in str(err.value) and DS_PATH + ".enabled" in str(err.value)


def test_data_efficiency_switch_off_contradicts_flag(tmp_path):
    with open(GPT13B) as f:
        data = json.load(f)
    data["data_efficiency"]["enabled"] = False
    path = write_json(tmp_path, data)
    with pytest.raises(UserError, match=r"--random-ltd .*data_efficiency\.enabled"):
        cfg_of(gpt("--random-ltd", "--deepspeed_config", path))


def test_json_without_random_ltd_section_uses_flags(tmp_path):
    path = write_json(tmp_path, {"train_batch_size": 8})
    cfg = cfg_of(gpt("--random-ltd", "--random-ltd-start", "64", "--random-ltd-schedule-steps",
                     "10", "--deepspeed_config", path))
    assert cfg.start == 64 and cfg.model_type is None


# -- flags --------------------------------------------------------------------------------------


def test_nothing_asked_gives_none():
    assert cfg_of(gpt()) is None


def test_flags_alone_defaults():
    cfg = cfg_of(gpt("--random-ltd", "--random-ltd-start", "128",
                     "--random-ltd-schedule-steps", "1000", layers=6, seq=256))
    assert cfg.layer_ids == (1, 2, 3, 4)
    assert (cfg.step, cfg.schedule, cfg.root_degree, cfg.method) == (
        16, "fixed_linear", 1.0, "random")
    assert cfg.layer_starts is None and not cfg.keep_special_tokens
    assert cfg.deepspeed_config is None and cfg.hidden_state_order == "seq_batch_dim"


def test_flags_all_options():
    cfg = cfg_of(gpt("--random-ltd", "--random-ltd-method", "tokenbypass",
                     "--random-ltd-layer-ids", "3", "1", "2", "--random-ltd-schedule",
                     "fixed_root", "--random-ltd-root-degree", "3",
                     "--random-ltd-schedule-tokens", "5000000", "--random-ltd-step", "8",
                     "--random-ltd-layer-starts", "16", "48",
                     "--random-ltd-keep-special-tokens", "--train-layer-tokens", "10000000",
                     "--layer-token-lr", "--lr-warmup-layer-tokens", "1000",
                     layers=5, seq=128))
    assert cfg.method == "tokenbypass" and cfg.layer_ids == (1, 2, 3)
    assert (cfg.schedule, cfg.root_degree, cfg.schedule_tokens, cfg.schedule_steps) == (
        "fixed_root", 3.0, 5000000, None)
    assert cfg.layer_starts == (16, 32, 48) and cfg.start == 16
    assert cfg.keep_special_tokens and cfg.layer_token_lr
    assert (cfg.train_layer_tokens, cfg.lr_warmup_layer_tokens, cfg.lr_decay_layer_tokens) == (
        10000000, 1000, None)
    sched = RandomLTDScheduler.from_config(cfg, 5, 128)
    assert sched.kept_lengths(0, 0) == {1: 16, 2: 32, 3: 48}


def test_fixed_root_default_degree_and_constant():
    cfg = cfg_of(gpt("--random-ltd", "--random-ltd-start", "64", "--random-ltd-schedule",
                     "fixed_root", "--random-ltd-schedule-steps", "10", layers=4, seq=128))
    assert cfg.root_degree == 2.0
    cfg = cfg_of(gpt("--random-ltd", "--random-ltd-start", "100", "--random-ltd-schedule",
                     "constant", layers=4, seq=128))
    assert (cfg.start, cfg.schedule_steps) == (100, None)
    assert RandomLTDScheduler.from_config(cfg, 4, 128).kept_lengths(10 ** 6) == {1: 100, 2: 100}


def test_layer_token_options_without_dropping():
    cfg = cfg_of(gpt("--train-layer-tokens", "1000000", "--layer-token-lr", layers=4, seq=64))
    assert cfg is not None and not cfg.enabled and cfg.layer_ids == ()
    sched = RandomLTDScheduler.from_config(cfg, 4, 64)
    assert sched.kept_lengths(0) == {}
    assert sched.step(8) == 8 * 64 * 4
    assert RandomLTDScheduler.from_config(None, 4, 64).step(2) == 2 * 64 * 4


def test_explicit_per_layer_starts():
    cfg = cfg_of(gpt("--random-ltd", "--random-ltd-layer-starts", "32", "16", "64",
                     "--random-ltd-schedule-steps", "10", layers=5, seq=128))
    assert cfg.layer_starts == (32, 16, 64) and cfg.start == 16


# -- JSON + flags -------------------------------------------------------------------------------


def test_json_with_agreeing_flags():
    ids = [str(i) for i in range(1, 23)]
    cfg = cfg_of(gpt("--random-ltd", "--deepspeed_config", GPT13B, "--random-ltd-start", "128",
                     "--random-ltd-step", "16", "--random-ltd-schedule-steps", "200000",
                     "--random-ltd-schedule", "fixed_linear", "--random-ltd-layer-ids", *ids))
    assert cfg == cfg_of(gpt("--random-ltd", "--deepspeed_config", GPT13B))


@pytest.mark.parametrize("flags, key", [
    (["--random-ltd-start", "256"], "random_ltd_schedule.min_value"),
    (["--random-ltd-step", "8"], "random_ltd_schedule.schedule_config.seq_per_step"),
    (["--random-ltd-schedule-steps", "100000"],
     "random_ltd_schedule.schedule_config.require_steps"),
    (["--random-ltd-schedule", "constant"], "random_ltd_schedule.schedule_type"),
    (["--random-ltd-layer-ids", "1", "2", "3"], "random_ltd_layer_id"),
])
def test_json_with_contradicting_flags(flags, key):
    with pytest.raises(UserError) as err:
        cfg_of(gpt("--random-ltd", "--deepspeed_config", GPT13B, *flags))
    msg = str(err.value)
    assert flags[0] in msg and f"{DS_PATH}.{key}" in msg and GPT13B in msg
    assert "\n" not in msg


def test_layer_token_lr_json(tmp_path):
    def on(sec):
        sec["layer_token_lr_schedule"] = {"enabled": True, "warmup_layer_tokens": 10,
                                          "total_layer_tokens": 1000}
    cfg = cfg_of(gpt("--deepspeed_config", ds_with(tmp_path, on)))
    assert cfg.layer_token_lr and (cfg.lr_warmup_layer_tokens, cfg.lr_decay_layer_tokens) == (
        10, 1000)

    def off(sec):
        sec["layer_token_lr_schedule"] = {"enabled": False}
    with pytest.raises(UserError, match="--layer-token-lr .*layer_token_lr_schedule.enabled"):
        cfg_of(gpt("--layer-token-lr", "--deepspeed_config", ds_with(tmp_path, off)))


def test_deepspeed_section_round_trip(tmp_path):
    cfg = cfg_of(gpt("--random-ltd", "--random-ltd-start", "64", "--random-ltd-schedule",
                     "fixed_root", "--random-ltd-root-degree", "1.5",
                     "--random-ltd-schedule-tokens", "123456", "--random-ltd-layer-ids", "2",
                     "4", layers=6, seq=256))
    data = {"data_efficiency": {"enabled": True, "data_routing": {
        "enabled": True, "random_ltd": cfg.deepspeed_section()}}}
    path = write_json(tmp_path, data)
    again = cfg_of(gpt("--deepspeed_config", path, layers=6, seq=256))
    assert again.__dict__ | {"deepspeed_config": None} == cfg.__dict__


# -- bad input ----------------------------------------------------------------------------------


def _edit(path_keys, value):
    def edit(sec):
        node = sec
        for k in path_keys[:-1]:
            node = node[k]
        node[path_keys[-1]] = value
    return edit


@pytest.mark.parametrize("keys, value, argv_extra, must_name", [
    (["total_layer_num"], 12, [], ["--num-layers", "total_layer_num"]),
    (["random_ltd_layer_num"], 20, [], ["random_ltd_layer_num", "random_ltd_layer_id"]),
    (["random_ltd_layer_id"], list(range(1, 24)), [], ["random_ltd_layer_id", "[23]"]),
    (["random_ltd_layer_id"], [1, 2, 30], [], ["random_ltd_layer_id", "out of range"]),
    (["random_ltd_layer_id"], "1,2", [], ["random_ltd_layer_id", "list of integers"]),
    (["random_ltd_schedule", "max_value"], 1024, [], ["--seq-length", "max_value"]),
    (["random_ltd_schedule", "min_value"], 4096, [], ["random_ltd_schedule.min_value",
                                                      "--seq-length"]),
    (["random_ltd_schedule", "schedule_type"], "fixed_discrete", [], ["schedule_type"]),
    (["random_ltd_schedule", "schedule_config"], {"seq_per_step": 16}, [],
     ["--random-ltd-schedule-steps", "require_steps"]),
    (["model_type"], "vision", [], ["model_type"]),
    (["enabled"], "yes", [], [".enabled", "bool"]),
])
def test_bad_json_values(tmp_path, keys, value, argv_extra, must_name):
    if keys == ["random_ltd_layer_id"] and value == list(range(1, 24)):
        ds_edit = lambda sec: (_edit(keys, value)(sec),  # noqa: E731
                               sec.__setitem__("random_ltd_layer_num", 23))
    else:
        ds_edit = _edit(keys, value)
    path = ds_with(tmp_path, ds_edit)
    with pytest.raises(UserError) as err:
        cfg_of(gpt("--random-ltd", "--deepspeed_config", path, *argv_extra))
    for word in must_name:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize("argv, must_name", [
    (["--random-ltd", "--random-ltd-schedule-steps", "10"], "--random-ltd-start"),
    (["--random-ltd", "--random-ltd-start", "64"], "--random-ltd-schedule-steps"),
    (["--random-ltd", "--random-ltd-start", "512", "--random-ltd-schedule-steps", "10"],
     "--seq-length"),
    (["--random-ltd", "--random-ltd-start", "0", "--random-ltd-schedule-steps", "10"],
     "--random-ltd-start"),
    (["--random-ltd", "--random-ltd-start", "8", "--random-ltd-schedule-steps", "10"],
     "--random-ltd-step"),
    (["--random-ltd", "--random-ltd-start", "64", "--random-ltd-step", "0",
      "--random-ltd-schedule-steps", "10"], "--random-ltd-step"),
    (["--random-ltd", "--random-ltd-start", "64", "--random-ltd-step", "512",
      "--random-ltd-schedule-steps", "10"], "--random-ltd-step"),
    (["--random-ltd", "--random-ltd-start", "64", "--random-ltd-schedule-steps", "0"],
     "--random-ltd-schedule-steps"),
    (["--random-ltd", "--random-ltd-start", "64", "--random-ltd-schedule-steps", "10",
      "--random-ltd-schedule-tokens", "10"], "mutually exclusive"),
    (["--random-ltd", "--random-ltd-start", "64", "--random-ltd-schedule-steps", "10",
      "--random-ltd-layer-ids", "1", "9"], "--random-ltd-layer-ids"),
    (["--random-ltd", "--random-ltd-start", "64", "--random-ltd-schedule-steps", "10",
      "--random-ltd-layer-ids", "1", "1"], "duplicate"),
    (["--random-ltd", "--random-ltd-start", "64", "--random-ltd-schedule-steps", "10",
      "--random-ltd-layer-ids", "0", "1"], "first/last"),
    (["--random-ltd", "--random-ltd-start", "64", "--random-ltd-schedule-steps", "10",
      "--random-ltd-root-degree", "2"], "fixed_root"),
    (["--random-ltd", "--random-ltd-start", "64", "--random-ltd-schedule", "fixed_root",
      "--random-ltd-schedule-steps", "10", "--random-ltd-root-degree", "0"],
     "--random-ltd-root-degree"),
    (["--random-ltd", "--random-ltd-layer-starts", "16", "32", "48",
      "--random-ltd-schedule-steps", "10"], "--random-ltd-layer-starts"),
    (["--random-ltd", "--random-ltd-start", "32", "--random-ltd-layer-starts", "16", "48",
      "--random-ltd-schedule-steps", "10"], "--random-ltd-start"),
    (["--random-ltd-start", "64"], "--random-ltd"),
    (["--lr-warmup-layer-tokens", "10", "--train-layer-tokens", "100"], "--layer-token-lr"),
    (["--layer-token-lr", "--lr-warmup-layer-tokens", "10", "--lr-decay-layer-tokens", "10"],
     "--lr-decay-layer-tokens"),
    (["--train-layer-tokens", "0"], "--train-layer-tokens"),
    (["--random-ltd", "--sctd-interval", "5"], "--sctd-interval"),  # sctd is a method now
    # dropping options without --random-ltd used to give a dense run silently
    (["--random-ltd-method", "tokenbypass"], "--random-ltd"),
    (["--random-ltd-method", "tokenbypass", "--train-layer-tokens", "100"], "--random-ltd"),
    (["--random-ltd-keep-special-tokens"], "--random-ltd-keep-special-tokens"),
    # sequence parallelism splits the kept tokens over TP ranks: caught at start-up, not at the
    # first kept length that is not a multiple of TP (step 1 here: 64 -> 66)
    (["--random-ltd", "--random-ltd-start", "64", "--random-ltd-step", "6",
      "--random-ltd-schedule-steps", "10", "--sequence-parallel",
      "--tensor-model-parallel-size", "4"], "--random-ltd-step"),
    (["--random-ltd", "--random-ltd-start", "66", "--random-ltd-schedule", "constant",
      "--sequence-parallel", "--tensor-model-parallel-size", "4"], "--random-ltd-start"),
])
def test_bad_flags(argv, must_name):
    with pytest.raises(UserError) as err:
        cfg_of(gpt(*argv, layers=6, seq=256))
    assert must_name in str(err.value), str(err.value)


def test_too_few_layers_for_default_ids():
    with pytest.raises(UserError, match="--num-layers"):
        cfg_of(gpt("--random-ltd", "--random-ltd-start", "64", "--random-ltd-schedule-steps",
                   "10", layers=2, seq=256))


def test_missing_and_malformed_json(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(UserError, match="nope.json: no such file"):
        cfg_of(gpt("--random-ltd", "--deepspeed_config", missing))
    bad = tmp_path / "bad.json"
    bad.write_text('{"data_efficiency": {"enabled": true,,}}')
    with pytest.raises(UserError, match=r"bad.json: not valid JSON \(line 1"):
        cfg_of(gpt("--random-ltd", "--deepspeed_config", str(bad)))
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(UserError, match="arr.json: expected a JSON object"):
        cfg_of(gpt("--random-ltd", "--deepspeed_config", str(arr)))


def test_config_is_frozen():
    cfg = cfg_of(gpt("--deepspeed_config", GPT13B))
    with pytest.raises(Exception):
        cfg.start = 1
    assert copy.deepcopy(cfg) == cfg


def test_full_flow_from_megatron_flags():
    from megatron.arguments import parse_args
    from megatron.ltd.layer_tokens import layer_token_lr_horizons_from_args

    extra = None if "--random-ltd" in build_parser()._option_string_actions else \
        add_random_ltd_args
    args = parse_args(gpt("--hidden-size", "64", "--num-attention-heads", "4",
                          "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
                          "--train-iters", "10", "--lr-warmup-iters", "2", "--mock-data",
                          "--random-ltd", "--random-ltd-start", "16", "--random-ltd-step", "8",
                          "--random-ltd-schedule-steps", "4", "--layer-token-lr",
                          layers=4, seq=32),
                      extra_args_provider=extra, world_size=1)
    cfg = random_ltd_config_from_args(args)
    sched = RandomLTDScheduler.from_config(cfg, args.num_layers, args.seq_length)
    warmup, decay = layer_token_lr_horizons_from_args(args, cfg, sched)
    assert warmup == 4 * 32 * 4 * 2
    # kept 16, 16, 24, 24, 32... over 10 steps: 2 full layers + 2 dropping layers
    per_sample = [2 * 32 + 2 * k for k in (16, 16, 24, 24, 32, 32, 32, 32, 32, 32)]
    assert decay == 4 * sum(per_sample)


def test_sequence_parallel_kept_lengths_multiple_of_tp():
    """Every kept length of these schedules is a multiple of TP, so they are accepted; TP 1 (or
    no sequence parallelism) has no such constraint."""
    ok = ["--random-ltd", "--random-ltd-start", "72", "--random-ltd-step", "8",
          "--random-ltd-schedule-steps", "10"]
    cfg = cfg_of(gpt(*ok, "--sequence-parallel", "--tensor-model-parallel-size", "4",
                     layers=6, seq=256))
    sched = RandomLTDScheduler.from_config(cfg, 6, 256)
    assert all(v % 4 == 0 for t in range(12) for v in sched.kept_lengths(t).values())
    cfg_of(gpt("--random-ltd", "--random-ltd-start", "64", "--random-ltd-step", "6",
               "--random-ltd-schedule-steps", "10", layers=6, seq=256))


def test_edge_layers_only_with_the_ablation_flag():
    """The first/last layer never drop (random-LTD keeps them full; paper Tab. 5) unless the
    ablation flag --random-ltd-allow-edge-layers says so; the flag alone needs --random-ltd."""
    base = ["--random-ltd", "--random-ltd-start", "64", "--random-ltd-schedule-steps", "10"]
    for ids in (["0", "1"], ["10", "11"]):
        with pytest.raises(UserError, match="--random-ltd-allow-edge-layers"):
            cfg_of(gpt(*base, "--random-ltd-layer-ids", *ids, layers=12, seq=128))
    cfg = cfg_of(gpt(*base, "--random-ltd-allow-edge-layers", "--random-ltd-layer-ids",
                     *map(str, range(12)), layers=12, seq=128))
    assert cfg.layer_ids == tuple(range(12))
    cfg = cfg_of(gpt(*base, "--random-ltd-allow-edge-layers", "--random-ltd-layer-ids", "0",
                     layers=12, seq=128))
    assert cfg.layer_ids == (0,)
    # without the flag's use the default stays the middle layers
    cfg = cfg_of(gpt(*base, "--random-ltd-allow-edge-layers", layers=12, seq=128))
    assert cfg.layer_ids == tuple(range(1, 11))
    with pytest.raises(UserError, match="--random-ltd-allow-edge-layers needs --random-ltd"):
        cfg_of(gpt("--random-ltd-allow-edge-layers", layers=12, seq=128))
