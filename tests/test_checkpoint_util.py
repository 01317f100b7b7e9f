"""tools/checkpoint_util.py: TP/PP conversion of model and optimizer state, exact round trips,
one-line errors."""

import argparse
import os
import subprocess
import sys

import pytest
import torch

from megatron.checkpointing import (TRACKER_FILENAME, TrainState, checkpoint_file,
                                    flat_model_state, load_checkpoint, megatron_model_state,
                                    save_checkpoint)
from megatron.errors import UserError, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import checkpoint_util  # noqa: E402

V, H, HEADS, S, LAYERS = 64, 16, 4, 8, 4


def _args(root, untie=False):
    return argparse.Namespace(
        save=root, load=root, no_save_optim=False, no_save_rng=False, no_load_optim=False,
        no_load_rng=False, finetune=False, exit_on_missing_checkpoint=True,
        num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, ffn_hidden_size=4 * H,
        padded_vocab_size=V, seq_length=S, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, untie_embeddings_and_output_weights=untie,
        consumed_train_samples=0)


class _Sched:
    def state_dict(self):
        return {"num_steps": 24}

    def load_state_dict(self, sd):
        self.loaded = sd


def _model(dtype, untie):
    from megatron.model import GPTModel, TransformerConfig

    torch.manual_seed(0)
    return GPTModel(TransformerConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS,
                                      seq_length=S, padded_vocab_size=V, hidden_dropout=0.0,
                                      attention_dropout=0.0, params_dtype=dtype,
                                      untie_embeddings_and_output_weights=untie))


def _optimizer(model, dtype):
    from megatron.optim import build_optimizer

    return build_optimizer(model, lr=1e-2, bf16=dtype == torch.bfloat16, log=lambda *_: None)


def _read(path):
    """A checkpoint file with its (Megatron-nested) ``model`` entry by parameter name."""
    ckpt = torch.load(path, weights_only=False)
    assert "language_model" in ckpt["model"]  # nested as Megatron-LM
    ckpt["model"] = flat_model_state(ckpt["model"])
    return ckpt


def _make_checkpoint(root, dtype=torch.float32, untie=False, tracker=None):
    """A single-process checkpoint after two optimizer steps (non-zero Adam moments)."""
    model = _model(dtype, untie)
    opt = _optimizer(model, dtype)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        opt.zero_grad()
        tokens = torch.randint(0, V, (2, S + 1), generator=g)
        model(tokens[:, :-1], labels=tokens[:, 1:]).float().mean().backward()
        opt.step()
    save_checkpoint(_args(root, untie), TrainState(iteration=3, consumed_train_samples=24,
                                                   consumed_train_tokens=192),
                    model, opt, _Sched(), tracker=tracker, log=lambda *_: None)
    return _read(checkpoint_file(root, 3))


# An independent splitter by name (the converter's inverse), for the model tensors.
def _split_tensor(name, tensor, t, tp):
    if name.endswith(("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight",
                      "dense_h_to_4h.bias", "word_embeddings.weight", "output_layer.weight")):
        rows = tensor.shape[0] // tp
        return tensor[t * rows:(t + 1) * rows]
    if name.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
        cols = tensor.shape[1] // tp
        return tensor[:, t * cols:(t + 1) * cols]
    return tensor


def _expected_shard(full_model, t, tp, p, pp, tied):
    per = LAYERS // pp
    out = {}
    for name, tensor in full_model.items():
        parts = name.split(".")
        if "layers" in parts:
            i = parts.index("layers") + 1
            layer = int(parts[i])
            if not p * per <= layer < (p + 1) * per:
                continue
            parts[i] = str(layer - p * per)
            out[".".join(parts)] = _split_tensor(name, tensor, t, tp)
        elif "embedding" in parts:
            if p == 0:
                out[name] = _split_tensor(name, tensor, t, tp)
        elif p == pp - 1:
            out[name] = _split_tensor(name, tensor, t, tp)
    if tied and pp > 1 and p == pp - 1:
        out["word_embeddings.weight"] = _split_tensor(
            "word_embeddings.weight",
            full_model["language_model.embedding.word_embeddings.weight"], t, tp)
    return out


def _inner(opt):
    return opt["optimizer"] if "fp32_from_fp16_params" in opt else opt


def _assert_same_checkpoint(a, b, tp=1, pp=1):
    assert list(a["model"]) == list(b["model"])
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["optimizer_param_names"] == b["optimizer_param_names"]
    ia, ib = _inner(a["optimizer"]), _inner(b["optimizer"])
    assert [g["params"] for g in ia["param_groups"]] == [g["params"] for g in ib["param_groups"]]
    assert [{k: v for k, v in g.items() if k != "params"} for g in ia["param_groups"]] == \
        [{k: v for k, v in g.items() if k != "params"} for g in ib["param_groups"]]
    assert sorted(ia["state"]) == sorted(ib["state"])
    for index in ia["state"]:
        for key, value in ia["state"][index].items():
            assert torch.equal(value, ib["state"][index][key]), (index, key)
    if "fp32_from_fp16_params" in a["optimizer"]:
        for ga, gb in zip(a["optimizer"]["fp32_from_fp16_params"],
                          b["optimizer"]["fp32_from_fp16_params"]):
            assert len(ga) == len(gb)
            for x, y in zip(ga, gb):
                assert x.dtype == torch.float32 and torch.equal(x, y)
    for key in ("iteration", "tokens", "train_state", "opt_param_scheduler",
                "checkpoint_version"):
        assert a[key] == b[key], key
    assert b["args"].tensor_model_parallel_size == tp
    assert b["args"].pipeline_model_parallel_size == pp
    assert b["args"].consumed_train_samples == a["args"].consumed_train_samples
    assert len(b["rng_state"]) == 1


@pytest.mark.parametrize("dtype,untie", [(torch.float32, False), (torch.bfloat16, True)])
def test_round_trip_tp1_to_tp2pp2_and_back_is_exact(tmp_path, dtype, untie):
    src, mid, back = (str(tmp_path / d) for d in ("src", "tp2pp2", "back"))
    original = _make_checkpoint(src, dtype, untie)
    checkpoint_util.convert(src, mid, 2, 2, log=lambda *_: None)
    with open(os.path.join(mid, TRACKER_FILENAME)) as f:
        assert f.read() == "3"
    assert sorted(os.listdir(os.path.join(mid, "iter_0000003"))) == \
        ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    full_opt = _inner(original["optimizer"])
    full_index = {name: i for names, group in zip(original["optimizer_param_names"],
                                                  full_opt["param_groups"])
                  for name, i in zip(names, group["params"])}
    for p in range(2):
        for t in range(2):
            shard = _read(checkpoint_file(mid, 3, t, p, 2))
            expected = _expected_shard(original["model"], t, 2, p, 2, tied=not untie)
            assert list(shard["model"]) == list(expected)
            for name, tensor in expected.items():
                assert torch.equal(shard["model"][name], tensor), (t, p, name)
                assert shard["model"][name].dtype == dtype
            # Adam moments follow their parameter's partitioning
            opt = _inner(shard["optimizer"])
            for names, group in zip(shard["optimizer_param_names"], opt["param_groups"]):
                for local, index in zip(names, group["params"]):
                    full_name = _global_name(local, p, 2, tied=not untie)
                    for key in ("exp_avg", "exp_avg_sq"):
                        want = _split_tensor(full_name,
                                             full_opt["state"][full_index[full_name]][key], t, 2)
                        assert torch.equal(opt["state"][index][key], want), (local, key)
                    assert shard["model"][local].shape == opt["state"][index]["exp_avg"].shape
    checkpoint_util.convert(mid, back, 1, 1, log=lambda *_: None)
    _assert_same_checkpoint(original, _read(checkpoint_file(back, 3)))
    # the converted checkpoint loads into the single-process model and optimizer
    model = _model(dtype, untie)
    opt = _optimizer(model, dtype)
    state, _ = load_checkpoint(_args(back, untie), model, opt, _Sched(), log=lambda *_: None)
    assert state.iteration == 3 and state.consumed_train_samples == 24
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original["model"][name])


def _global_name(local, p, pp, tied):
    if local == "word_embeddings.weight":
        return "language_model.embedding.word_embeddings.weight"
    parts = local.split(".")
    if "layers" in parts:
        i = parts.index("layers") + 1
        parts[i] = str(int(parts[i]) + p * LAYERS // pp)
    return ".".join(parts)


def test_hand_split_shards_merge_to_the_original(tmp_path):
    """TP=2 x PP=2 model shards made by the independent splitter (no optimizer state, as a
    converted Megatron-LM checkpoint) merge to the original model exactly."""
    src, shards, merged = (str(tmp_path / d) for d in ("src", "shards", "merged"))
    original = _make_checkpoint(src)
    for p in range(2):
        for t in range(2):
            ckpt = {k: v for k, v in original.items()
                    if k not in ("model", "optimizer", "optimizer_param_names")}
            ckpt["args"] = argparse.Namespace(**{**vars(original["args"]),
                                                 "tensor_model_parallel_size": 2,
                                                 "pipeline_model_parallel_size": 2})
            # nested as Megatron-LM writes it ('word_embeddings_for_head' on the last stage)
            ckpt["model"] = megatron_model_state({k: v.clone() for k, v in _expected_shard(
                original["model"], t, 2, p, 2, tied=True).items()})
            path = checkpoint_file(shards, 3, t, p, 2)
            os.makedirs(os.path.dirname(path))
            torch.save(ckpt, path)
    with open(os.path.join(shards, TRACKER_FILENAME), "w") as f:
        f.write("3")
    checkpoint_util.convert(shards, merged, 1, 1, log=lambda *_: None)
    out = _read(checkpoint_file(merged, 3))
    assert list(out["model"]) == list(original["model"])
    for name, tensor in original["model"].items():
        assert torch.equal(out["model"][name], tensor), name
    assert "optimizer" not in out


@pytest.mark.slow
def test_optimizer_names_reconstructed_without_the_names_entry(tmp_path):
    src, a, b = (str(tmp_path / d) for d in ("src", "a", "b"))
    original = _make_checkpoint(src)
    del original["optimizer_param_names"]  # as written by Megatron-LM
    torch.save(original, checkpoint_file(src, 3))
    checkpoint_util.convert(src, a, 2, 1, log=lambda *_: None)
    checkpoint_util.convert(a, b, 1, 1, log=lambda *_: None)
    out = _read(checkpoint_file(b, 3))
    for index, entry in original["optimizer"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(out["optimizer"]["state"][index][key], value)


def test_errors_are_one_line(tmp_path, capsys):
    src = str(tmp_path / "src")
    with pytest.raises(UserError, match="no latest_checkpointed_iteration.txt"):
        checkpoint_util.convert(src, str(tmp_path / "x"), 1, 1)
    _make_checkpoint(src)
    with pytest.raises(UserError, match="3 does not divide the 4 attention heads"):
        checkpoint_util.convert(src, str(tmp_path / "x"), 3, 1)
    with pytest.raises(UserError, match="pipeline-parallel-size 3 does not divide the 4 layers"):
        checkpoint_util.convert(src, str(tmp_path / "x"), 1, 3)
    with open(checkpoint_file(src, 3), "r+b") as f:
        f.truncate(100)
    with pytest.raises(SystemExit) as exit_:
        run_main(checkpoint_util.main, ["--load", src, "--save", str(tmp_path / "x"),
                                        "--target-tensor-parallel-size", "1",
                                        "--target-pipeline-parallel-size", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read checkpoint") and err.count("\n") == 1
    assert not os.path.exists(os.path.join(str(tmp_path / "x"), TRACKER_FILENAME))


@pytest.mark.slow
def test_command_line(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    _make_checkpoint(src)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint_util.py"),
                           "--load", src, "--save", dst, "--target-tensor-parallel-size", "2",
                           "--target-pipeline-parallel-size", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(checkpoint_file(dst, 3, 1, 0, 1))


@pytest.mark.slow
def test_split_gives_each_copied_rank_its_own_dropout_streams(tmp_path):
    """TP1 -> TP2 x PP2: without fresh streams, tensor rank 1 would copy rank 0's tracker state
    (the same attention-dropout masks) and stage 1 stage 0's default generator. Copies get
    Megatron's seeds (seed + 100 pp, + 2718 + tp) mixed with the iteration; rank (0, 0) keeps
    the saved states; the TP ranks of a stage share the default generator."""
    from megatron.parallel.random import MODEL_PARALLEL_RNG, RNGStatesTracker, model_parallel_seed

    src, dst = str(tmp_path / "src"), str(tmp_path / "tp2pp2")
    tracker = RNGStatesTracker()
    tracker.add(MODEL_PARALLEL_RNG, model_parallel_seed(1234, 0))
    original = _make_checkpoint(src, tracker=tracker)
    checkpoint_util.convert(src, dst, 2, 2, log=lambda *_: None)
    got = {(t, p): _read(checkpoint_file(dst, 3, t, p, 2))["rng_state"][0]
           for t in range(2) for p in range(2)}
    saved = original["rng_state"][0]

    def tracker_state(entry):
        return entry["rng_tracker_states"][MODEL_PARALLEL_RNG]["cpu"]

    def generator(seed):
        return torch.Generator().manual_seed((seed * 1_000_003 + 3) % 2 ** 63).get_state()

    assert torch.equal(tracker_state(got[0, 0]), tracker_state(saved))
    assert torch.equal(got[0, 0]["torch_rng_state"], saved["torch_rng_state"])
    assert torch.equal(got[1, 0]["torch_rng_state"], saved["torch_rng_state"])
    for (t, p), entry in got.items():
        if (t, p) != (0, 0):
            assert torch.equal(tracker_state(entry),
                               generator(model_parallel_seed(1234 + 100 * p, t))), (t, p)
    for t in range(2):
        assert torch.equal(got[t, 1]["torch_rng_state"], generator(1234 + 100))
    # four different attention-dropout streams, two different default streams
    draws = []
    for entry in got.values():
        g = torch.Generator()
        g.set_state(tracker_state(entry))
        draws.append(tuple(torch.rand(4, generator=g).tolist()))
    assert len(set(draws)) == 4
    assert not torch.equal(got[0, 0]["torch_rng_state"], got[0, 1]["torch_rng_state"])
    assert got[0, 1]["random_rng_state"] == saved["random_rng_state"]
