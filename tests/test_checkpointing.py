"""megatron/checkpointing.py: Megatron-LM's nested 'model' entry, write failures end in one line
with the previous checkpoint intact, another TP/PP layout is named on load."""

import argparse
import dataclasses
import errno
import os
import subprocess
import sys

import pytest
import torch

from megatron import checkpointing
from megatron.checkpointing import (TRACKER_FILENAME, TrainState, checkpoint_file,
                                    flat_model_state, load_checkpoint, megatron_model_state,
                                    save_checkpoint)
from megatron.errors import UserError

from distributed_harness import run_distributed
from training_helpers import ROOT, gpt_argv, run

V, H, HEADS, S, LAYERS = 64, 16, 4, 8, 2


def _args(root, **extra):
    return argparse.Namespace(**{
        "save": root, "load": root, "no_save_optim": False, "no_save_rng": False,
        "no_load_optim": False, "no_load_rng": False, "finetune": False,
        "exit_on_missing_checkpoint": True, "num_layers": LAYERS, "hidden_size": H,
        "num_attention_heads": HEADS, "ffn_hidden_size": 4 * H, "padded_vocab_size": V,
        "seq_length": S, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "consumed_train_samples": 0, **extra})


class _Sched:
    def state_dict(self):
        return {"num_steps": 8}

    def load_state_dict(self, sd):
        self.loaded = sd


def _model(seed=0):
    from megatron.model import GPTModel, TransformerConfig

    torch.manual_seed(seed)
    return GPTModel(TransformerConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS,
                                      seq_length=S, padded_vocab_size=V, hidden_dropout=0.0,
                                      attention_dropout=0.0))


def _optimizer(model):
    from megatron.optim import build_optimizer

    return build_optimizer(model, lr=1e-2, log=lambda *_: None)


def _save(root, iteration, model=None):
    model = model or _model()
    save_checkpoint(_args(root), TrainState(iteration=iteration), model, _optimizer(model),
                    _Sched(), log=lambda *_: None)
    return model


# -- Megatron-LM's nested 'model' entry ----------------------------------------------------------

def test_model_entry_is_nested_as_megatron_lm():
    flat = {
        "language_model.embedding.word_embeddings.weight": torch.zeros(1),
        "language_model.embedding.position_embeddings.weight": torch.zeros(2),
        "language_model.encoder.layers.0.self_attention.query_key_value.weight": torch.zeros(3),
        "language_model.encoder.final_layernorm.bias": torch.zeros(4),
        "language_model.output_layer.weight": torch.zeros(5),
        "word_embeddings.weight": torch.zeros(6),  # last pipeline stage's tied copy
    }
    nested = megatron_model_state(flat)
    f = {".".join(name.split(".")[-2:]): t for name, t in flat.items()
         if name.startswith("language_model.")}
    assert nested == {
        "language_model": {
            "embedding": {"word_embeddings": {"weight": f["word_embeddings.weight"]},
                          "position_embeddings": {"weight": f["position_embeddings.weight"]}},
            "encoder": {"layers.0.self_attention.query_key_value.weight":
                        f["query_key_value.weight"],
                        "final_layernorm.bias": f["final_layernorm.bias"]},
            "output_layer": {"weight": f["output_layer.weight"]}},
        "word_embeddings_for_head": {"weight": flat["word_embeddings.weight"]},
    }
    assert nested["word_embeddings_for_head"]["weight"].shape == (6,)
    assert nested["language_model"]["embedding"]["word_embeddings"]["weight"].shape == (1,)
    assert list(flat_model_state(nested)) == list(flat)  # order kept
    assert flat_model_state(flat) == flat  # flat entries (older checkpoints) read as they are
    # Megatron's pre-'encoder' key
    old = {"language_model": {"transformer": {"final_layernorm.bias": torch.ones(1)}}}
    assert list(flat_model_state(old)) == ["language_model.encoder.final_layernorm.bias"]


def test_saved_model_entry_loads_into_megatron_structure_and_back(tmp_path):
    root = str(tmp_path / "ckpt")
    model = _save(root, 5)
    ckpt = torch.load(checkpoint_file(root, 5), weights_only=False)
    lm = ckpt["model"]["language_model"]
    assert set(lm) == {"embedding", "encoder"}
    assert torch.equal(lm["embedding"]["word_embeddings"]["weight"],
                       model.language_model.embedding.word_embeddings.weight)
    assert torch.equal(lm["encoder"]["layers.1.mlp.dense_4h_to_h.weight"],
                       model.language_model.encoder.layers[1].mlp.dense_4h_to_h.weight)
    # Megatron-LM's load: language_model.load_state_dict(ckpt['model']['language_model']) with
    # the embedding and encoder modules reading their own sub-dicts.
    fresh = _model(seed=1)
    fresh.language_model.encoder.load_state_dict(lm["encoder"])
    fresh.language_model.embedding.word_embeddings.load_state_dict(
        lm["embedding"]["word_embeddings"])
    fresh.language_model.embedding.position_embeddings.load_state_dict(
        lm["embedding"]["position_embeddings"])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    # and our loader reads it back
    again = _model(seed=2)
    state, _ = load_checkpoint(_args(root), again, _optimizer(again), _Sched(),
                               log=lambda *_: None)
    assert state.iteration == 5
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_flat_model_entry_of_older_checkpoints_still_loads(tmp_path):
    root = str(tmp_path / "ckpt")
    model = _save(root, 2)
    path = checkpoint_file(root, 2)
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"] = flat_model_state(ckpt["model"])
    torch.save(ckpt, path)
    again = _model(seed=3)
    load_checkpoint(_args(root, finetune=True), again, None, None, log=lambda *_: None)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


# -- write failures --------------------------------------------------------------------------------

def _no_leftovers(root):
    return [n for _, _, files in os.walk(root) for n in files if ".tmp" in n]


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = str(tmp_path / "ckpt")
    model = _save(root, 2)
    real_save = torch.save

    def disk_full(obj, f):
        # What torch does on a full disk: its zip writer raises a RuntimeError ("enforce fail
        # at inline_container.cc") while handling the OSError of the failed write.
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(checkpointing.torch, "save", disk_full)
    with pytest.raises(UserError) as info:
        _save(root, 4, model)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--save {root}: cannot write ")
    assert "No space left on device" in message and "previous checkpoint" in message
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    with open(os.path.join(root, TRACKER_FILENAME)) as f:
        assert f.read() == "2"
    assert not os.path.exists(checkpoint_file(root, 4))
    assert _no_leftovers(root) == []
    state, _ = load_checkpoint(_args(root), _model(), _optimizer(_model()), _Sched(),
                               log=lambda *_: None)
    assert state.iteration == 2


def test_other_runtime_errors_of_torch_save_keep_their_traceback(tmp_path, monkeypatch):
    def broken(obj, f):
        raise RuntimeError("some internal bug")

    monkeypatch.setattr(checkpointing.torch, "save", broken)
    with pytest.raises(RuntimeError, match="internal bug"):
        _save(str(tmp_path / "ckpt"), 1)
    assert _no_leftovers(str(tmp_path)) == []


@pytest.mark.slow
def test_save_into_a_file_ends_in_one_line_on_the_command_line(data_prefix, tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    proc = subprocess.run([sys.executable, "pretrain_gpt.py",
                           *gpt_argv(data_prefix, "--save", str(target), iters=2)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: --save {target}: cannot write ") and \
        "Not a directory" in lines[0]
    assert " iteration " not in proc.stdout  # found at start-up, before any training


def test_save_dir_is_checked_and_created_at_start_up(tmp_path):
    from megatron.checkpointing import check_save_dir

    root = tmp_path / "a" / "b"
    check_save_dir(str(root))
    assert root.is_dir() and list(root.iterdir()) == []  # the probe file is gone
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(UserError, match=r"--save .*/file/sub: cannot write checkpoints there"):
        check_save_dir(str(blocked / "sub"))


def _run_expecting_user_error(rank, world_size, argv):
    try:
        run(argv)
    except UserError as err:
        return str(err)
    return None


def test_a_rank_that_cannot_write_fails_every_rank_without_hanging(data_prefix, tmp_path):
    root = tmp_path / "ckpt"
    (root / "iter_0000002").mkdir(parents=True)
    (root / "iter_0000002" / "mp_rank_01").write_text("x")  # tensor rank 1 cannot write
    argv = gpt_argv(data_prefix, "--tensor-model-parallel-size", "2", "--save", str(root),
                    iters=2)
    errors = run_distributed(_run_expecting_user_error, 2, args=(argv,), timeout=120)
    assert "another rank could not write" in errors[0]
    assert "mp_rank_01" in errors[1] and "cannot write" in errors[1]
    assert not (root / TRACKER_FILENAME).exists()


# -- layouts ---------------------------------------------------------------------------------------

def test_loading_another_pipeline_layout_names_the_flags(tmp_path):
    from megatron.parallel.state import ParallelState

    root = str(tmp_path / "ckpt")
    model = _model()
    for pp_rank in range(2):  # the files of a PP=2 run (contents do not matter here)
        save_checkpoint(_args(root, pipeline_model_parallel_size=2), TrainState(iteration=3),
                        model, _optimizer(model), _Sched(), log=lambda *_: None,
                        parallel=ParallelState(pp_size=2, pp_rank=pp_rank))
    assert sorted(os.listdir(os.path.join(root, "iter_0000003"))) == \
        ["mp_rank_00_000", "mp_rank_00_001"]
    with pytest.raises(UserError, match="saved with --tensor-model-parallel-size 1 "
                                        "--pipeline-model-parallel-size 2 but this run has 1 "
                                        "and 1; convert it with tools/checkpoint_util.py"):
        load_checkpoint(_args(root), _model(), _optimizer(_model()), _Sched(),
                        log=lambda *_: None)


def test_release_tracker_loads_weights_only(tmp_path):
    root = str(tmp_path / "ckpt")
    model = _save(root, 4)
    os.rename(os.path.join(root, "iter_0000004"), os.path.join(root, "release"))
    with open(os.path.join(root, TRACKER_FILENAME), "w") as f:
        f.write("release")
    again = _model(seed=5)
    sched = _Sched()
    state, _ = load_checkpoint(_args(root), again, _optimizer(again), sched,
                               log=lambda *_: None)
    assert state.iteration == 0 and not hasattr(sched, "loaded")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    os.remove(os.path.join(root, "release", "mp_rank_00", "model_optim_rng.pt"))
    with pytest.raises(UserError, match="names release but .*release/mp_rank_00"):
        load_checkpoint(_args(root), again, None, None, log=lambda *_: None)


# -- checkpoints written by other Megatron tools ---------------------------------------------------

def _rewrite(root, iteration, edit):
    """Apply ``edit`` to the checkpoint dict of rank 0 and save it back (plain torch.save)."""
    path = checkpoint_file(root, iteration)
    ckpt = torch.load(path, weights_only=False)
    edit(ckpt)
    torch.save(ckpt, path)
    return path


def _assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_pp1_checkpoint_with_word_embeddings_for_head_loads(tmp_path):
    """Megatron tools may write the tied head's copy even at PP = 1; Megatron's loader ignores
    it there, and so do we (resume, finetune and load_pretrained_weights)."""
    from megatron.checkpointing import load_pretrained_weights

    root = str(tmp_path / "ckpt")
    model = _save(root, 2)

    def add_copy(ckpt):
        emb = ckpt["model"]["language_model"]["embedding"]["word_embeddings"]["weight"]
        ckpt["model"]["word_embeddings_for_head"] = {"weight": emb.clone()}

    _rewrite(root, 2, add_copy)
    for finetune in (False, True):
        again = _model(seed=4)
        load_checkpoint(_args(root, finetune=finetune), again, _optimizer(again), _Sched(),
                        log=lambda *_: None)
        _assert_same_weights(model, again)
    again = _model(seed=5)
    load_pretrained_weights(root, again, log=lambda *_: None)
    _assert_same_weights(model, again)


def test_args_without_seq_length_or_other_non_shape_fields_load(tmp_path):
    root = str(tmp_path / "ckpt")
    model = _save(root, 2)

    def strip(ckpt):
        for name in ("seq_length", "consumed_train_samples", "no_save_optim"):
            delattr(ckpt["args"], name)

    _rewrite(root, 2, strip)
    again = _model(seed=6)
    load_checkpoint(_args(root, finetune=True), again, None, None, log=lambda *_: None)
    _assert_same_weights(model, again)
    with pytest.raises(UserError, match="saved with --num-layers 2 but --num-layers 3"):
        load_checkpoint(_args(root, finetune=True, num_layers=3), _model(), None, None,
                        log=lambda *_: None)


@pytest.mark.parametrize("optimizer_entry", ["absent", None, {}])
def test_model_only_checkpoint_finetunes_and_resumes_only_without_the_optimizer(
        tmp_path, optimizer_entry):
    """checkpoint_util's model-only output (Megatron's saver writes no optimizer, others a
    placeholder): weights load for finetuning; resuming names --no-load-optim, and works
    with it."""
    root = str(tmp_path / "ckpt")
    model = _save(root, 2)

    def model_only(ckpt):
        for key in ("optimizer", "opt_param_scheduler", "optimizer_param_names", "rng_state"):
            ckpt.pop(key, None)
        if optimizer_entry != "absent":
            ckpt["optimizer"] = optimizer_entry

    path = _rewrite(root, 2, model_only)
    again = _model(seed=7)
    state, _ = load_checkpoint(_args(root, finetune=True), again, _optimizer(again), _Sched(),
                               log=lambda *_: None)
    assert state.iteration == 0
    _assert_same_weights(model, again)
    with pytest.raises(UserError, match=f"{path} holds no optimizer state .*pass "
                                        "--no-load-optim or --finetune"):
        load_checkpoint(_args(root), _model(), _optimizer(_model()), _Sched(),
                        log=lambda *_: None)
    resumed = _model(seed=8)
    state, _ = load_checkpoint(_args(root, no_load_optim=True, no_load_rng=True), resumed,
                               _optimizer(resumed), _Sched(), log=lambda *_: None)
    assert state.iteration == 2
    _assert_same_weights(model, resumed)


def test_optimizer_state_of_another_optimizer_is_one_line(tmp_path):
    root = str(tmp_path / "ckpt")
    _save(root, 2)

    def other_groups(ckpt):
        inner = ckpt["optimizer"].get("optimizer", ckpt["optimizer"])
        inner["param_groups"] = inner["param_groups"][:1]

    path = _rewrite(root, 2, other_groups)
    with pytest.raises(UserError, match=f"{path}: its optimizer state does not fit this run's "
                                        "optimizer .*pass --no-load-optim"):
        load_checkpoint(_args(root), _model(), _optimizer(_model()), _Sched(),
                        log=lambda *_: None)


@pytest.mark.parametrize("saved,message", [
    ({"bias_gelu_fusion": False}, "saved with the exact erf GeLU .* but this run computes the "
                                  "tanh-approximate GeLU .*: pass --no-bias-gelu-fusion"),
    ({"onnx_safe": True}, "holds a model this code cannot compute: --onnx-safe"),
    ({"swiglu": True}, "holds a model this code cannot compute: --swiglu"),
])
def test_a_checkpoint_whose_gelu_the_model_cannot_reproduce_is_refused(tmp_path, saved, message):
    """Megatron-LM's ParallelMLP: --openai-gelu -> tanh; else --onnx-safe -> erf_gelu (a
    rounded constant, not reproduced); else the fused bias-GeLU (tanh) when
    bias_gelu_fusion, F.gelu (erf) otherwise. A different function is never loaded."""
    root = str(tmp_path / "ckpt")
    _save(root, 2)
    _rewrite(root, 2, lambda ckpt: vars(ckpt["args"]).update(saved))
    with pytest.raises(UserError, match=message):
        load_checkpoint(_args(root, finetune=True), _model(), None, None, log=lambda *_: None)


def test_the_same_gelu_from_other_flags_loads(tmp_path):
    """--openai-gelu and the default fused bias-GeLU compute the same tanh GeLU; a checkpoint
    saved with --no-bias-gelu-fusion loads into a run that has it."""
    root = str(tmp_path / "ckpt")
    model = _save(root, 2)
    _rewrite(root, 2, lambda ckpt: vars(ckpt["args"]).update(openai_gelu=True))
    again = _model(seed=9)
    load_checkpoint(_args(root, finetune=True), again, None, None, log=lambda *_: None)
    _assert_same_weights(model, again)
    _rewrite(root, 2, lambda ckpt: vars(ckpt["args"]).update(openai_gelu=False,
                                                               bias_gelu_fusion=False))
    load_checkpoint(_args(root, finetune=True, bias_gelu_fusion=False), again, None, None,
                    log=lambda *_: None)


class _Payload:
    """Would create a file when unpickled, if unpickling ran code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _foreign_module(name, **classes):
    """A module of another Megatron code base, registered while pickling only."""
    import types

    module = types.ModuleType(name)
    for qualname, cls in classes.items():
        cls.__module__, cls.__qualname__ = name, qualname
        setattr(module, qualname, cls)
    return module


def test_checkpoint_files_never_run_code(tmp_path):
    """weights_only unpickling with an allowlist: objects of other Megatron code bases in args
    (an enum member, a config dataclass) load as stand-ins; any other object is refused in one
    line, without running."""
    import enum

    from megatron.checkpointing import ForeignObject, read_checkpoint_file

    class ModelType(enum.Enum):
        encoder_or_decoder = 1

    @dataclasses.dataclass
    class OptimizerConfig:
        lr: float = 0.1

    modules = {"megatron.other_code": _foreign_module("megatron.other_code"),
               "megatron.other_code.enums": _foreign_module("megatron.other_code.enums",
                                                            ModelType=ModelType),
               "megatron.other_code.config": _foreign_module("megatron.other_code.config",
                                                             OptimizerConfig=OptimizerConfig)}
    root = str(tmp_path / "ckpt")
    _save(root, 2)
    saved_modules = {k: sys.modules.get(k) for k in modules}
    sys.modules.update(modules)
    try:
        path = _rewrite(root, 2, lambda c: vars(c["args"]).update(
            model_type=ModelType.encoder_or_decoder, optimizer_config=OptimizerConfig(0.5)))
    finally:
        for name, value in saved_modules.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    args = read_checkpoint_file(path)["args"]
    assert args.model_type == ForeignObject(1) and args.optimizer_config.lr == 0.5
    load_checkpoint(_args(root), _model(), _optimizer(_model()), _Sched(), log=lambda *_: None)
    target, root = tmp_path / "ran", str(tmp_path / "payload")
    _save(root, 2)
    path = _rewrite(root, 2, lambda c: c.update(extra=_Payload(str(target))))
    with pytest.raises(UserError, match=f"cannot read checkpoint {path}: it holds a "
                                        "io.open object, which is not on the allowlist"):
        load_checkpoint(_args(root), _model(), _optimizer(_model()), _Sched(),
                        log=lambda *_: None)
    assert not target.exists()
