"""Checkpoints in Megatron-LM's directory layout, written atomically, resumed exactly.

Layout (as Megatron-LM)::

    <save>/latest_checkpointed_iteration.txt      "100" (or "release")
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt
    <save>/iter_0000100/mp_rank_00_001/...        (with pipeline parallelism)

``model_optim_rng.pt`` is a dict with Megatron's keys: ``args`` (the flags, with the consumed
samples/tokens Megatron keeps there), ``checkpoint_version``, ``iteration``, ``tokens``,
``model``, ``optimizer``, ``opt_param_scheduler``, ``rng_state`` (a list, one entry per
data-parallel rank). We add ``train_state`` (every counter of the loop, so a resume needs nothing
from ``args``). ``model`` is nested as Megatron-LM's ``state_dict_for_save_checkpoint``
(``['language_model']['embedding']['word_embeddings']['weight']``,
``['language_model']['encoder']['layers.0...']``; see ``megatron_model_state``), so either side
loads the other's checkpoints; loading also accepts flat parameter names.

Nothing is lost: each file is written to a temporary name, flushed to disk and renamed; the
tracker file is replaced last, so a crash at any moment leaves ``latest`` naming a complete
checkpoint. The temporary files of writers killed mid-save are removed at the next save: the
first save of each process (only a dead process leaves them) sweeps the --save tree, one process
per host (``megatron.checkpoint_files.remove_stale_temporaries``).

Parallel runs (``parallel=`` a ParallelState), as Megatron: every (tp, pp) rank has its own file;
data-parallel rank 0 of each writes it, with ``rng_state`` the list of every DP rank's RNG states
(all-gathered over DP); the ranks agree that every file was written (else all raise one
UserError naming the file, and the tracker keeps naming the previous checkpoint); then global
rank 0 replaces the tracker. The ``optimizer``
entry is the full torch state even with --use-distributed-optimizer (consolidated over DP, see
``megatron.optim.distributed``), so a run resumes with any DP size. Loading reads this rank's
file and its DP entry of ``rng_state`` (entry 0, with a warning, when the DP size changed).
Resuming from another TP/PP layout needs ``tools/checkpoint_util.py``; weights alone
(``--finetune``, a release checkpoint, ``load_pretrained_weights``) load from any layout
(``megatron.checkpoint_reshard``).

Files from disk never run code: ``read_checkpoint_file`` unpickles with ``weights_only=True``
and an allowlist (``argparse.Namespace``, numpy arrays for the RNG states, stand-ins for the
objects of other Megatron code bases: enum members in ``args``, config records), after checking
the file against the sizes and CRC-32s recorded in it when it was written
(``megatron.checkpoint_files``; --unsafe-load-checkpoint and --no-verify-checkpoint relax
either). A resume with another shape flag (--seq-length, --hidden-size, ...) names the flag, the
checkpoint's value and the given one. Checkpoints
of other Megatron tools load too: a PP = 1 checkpoint carrying ``word_embeddings_for_head``
(ignored, as Megatron's loader does), args without ``seq_length``, a model-only checkpoint (no
or an empty optimizer state: weights load for finetuning; resuming needs --no-load-optim). A
checkpoint whose architecture this model cannot compute -- a GeLU other than the one this run
computes included -- is refused in one line.
"""

import argparse
import dataclasses
import os
import re
import socket

import torch
import torch.distributed as dist

from megatron.checkpoint_files import (ForeignObject, ReadOptions,  # noqa: F401 (re-exported)
                                       atomic_torch_save, atomic_write_text, check_save_dir,
                                       read_checkpoint_file, remove_stale_temporaries)
from megatron.errors import UserError
from megatron.initialize import get_rng_state, set_rng_state
from megatron.model.module import (HEAD_COPY_KEY, LoadPolicy, flat_model_state,  # noqa: F401
                                   load_flat_state, megatron_model_state)
from megatron.parallel.state import ParallelState

CHECKPOINT_VERSION = 3.0
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILENAME = "model_optim_rng.pt"

@dataclasses.dataclass
class TrainState:
    """Counters of the training loop; saved in every checkpoint."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    consumed_train_tokens: int = 0
    skipped_iters: int = 0
    nan_iters: int = 0


def iteration_dir(root, iteration, release=False):
    return os.path.join(root, "release" if release else f"iter_{iteration:07d}")


def checkpoint_file(root, iteration, tp_rank=0, pp_rank=0, pp_size=1, release=False):
    rank_dir = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(iteration_dir(root, iteration, release), rank_dir, CHECKPOINT_FILENAME)


def saved_layout(directory):
    """(tp, pp) sizes implied by the ``mp_rank_*`` directories in ``directory``; None if there
    are none."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    ranks = [re.match(r"^mp_rank_(\d{2})(?:_(\d{3}))?$", n) for n in names]
    ranks = [(int(m.group(1)), int(m.group(2)) if m.group(2) else None) for m in ranks if m]
    if not ranks:
        return None
    tp = max(t for t, _ in ranks) + 1
    pp = max(p if p is not None else 0 for _, p in ranks) + 1
    return tp, pp


def read_tracker(root):
    """(iteration, release) from ``latest_checkpointed_iteration.txt``; None if there is none."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:  # garbage: int() below names the file
        text = f.read().strip()
    if text == "release":
        return 0, True
    try:
        iteration = int(text)
    except ValueError:
        raise UserError(f"{path}: expected an iteration number or 'release', found {text!r}")
    if iteration <= 0:
        raise UserError(f"{path}: iteration must be positive, found {iteration}")
    return iteration, False


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _unwrap(model):
    from megatron.parallel.data_parallel import unwrap

    return unwrap(model)


def optimizer_param_names(model, optimizer):
    """Names of the parameters of each optimizer group, in the order of the optimizer's state
    indices (fp32 masters named after their model parameter); None if one is not found."""
    names = {id(p): n for n, p in _unwrap(model).named_parameters()}
    for model_groups, master_groups in zip(getattr(optimizer, "float16_groups", []),
                                           getattr(optimizer, "fp32_from_float16_groups", [])):
        for param, master in zip(model_groups, master_groups):
            if id(param) in names:
                names[id(master)] = names[id(param)]
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except (KeyError, AttributeError, TypeError):
        return None


def _gather_rng_states(tracker, parallel):
    """This rank's RNG states, all-gathered over the data-parallel group (DP rank order)."""
    mine = get_rng_state(tracker)
    if parallel.dp_size == 1 or parallel.dp_group is None:
        return [mine]
    states = [None] * parallel.dp_size
    dist.all_gather_object(states, mine, group=parallel.dp_group)
    return states


def save_checkpoint(args, state, model, optimizer, scheduler, tracker=None, log=print,
                    extra_state=None, parallel=None):
    """Save everything needed to continue bit-identically, then point ``latest`` at it.

    Every rank calls this (the RNG gather and the distributed optimizer's consolidation are
    collectives); DP rank 0 of each (tp, pp) rank writes its file.
    """
    parallel = parallel or ParallelState()
    root = args.save
    log(f"saving checkpoint at iteration {state.iteration:7d} to {root}")
    _sweep_once(root, log)
    # Megatron keeps the consumed counters on args; keep them in sync for compatibility.
    args.consumed_train_samples = state.consumed_train_samples
    args.consumed_valid_samples = state.consumed_valid_samples
    args.consumed_train_tokens = state.consumed_train_tokens
    ckpt = {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": state.iteration,
        "tokens": state.consumed_train_tokens,
        "train_state": dataclasses.asdict(state),
        **_model_entries(_unwrap(model)),
    }
    if not args.no_save_optim:
        ckpt["optimizer"] = optimizer.state_dict()  # collective with a distributed optimizer
        ckpt["opt_param_scheduler"] = scheduler.state_dict()
        names = optimizer_param_names(model, optimizer)
        if names is not None:  # lets tools/checkpoint_util.py reshard the optimizer state
            ckpt["optimizer_param_names"] = names
    if not args.no_save_rng:
        ckpt["rng_state"] = _gather_rng_states(tracker, parallel)
    if extra_state:
        ckpt.update(extra_state)
    tracker_path = os.path.join(root, TRACKER_FILENAME)
    error = None
    if parallel.dp_rank == 0:
        path = checkpoint_file(root, state.iteration, parallel.tp_rank, parallel.pp_rank,
                               parallel.pp_size)
        try:
            atomic_torch_save(ckpt, path)
        except UserError as err:
            error = err
    # Every rank learns whether every file was written (a failing writer must not leave the
    # others waiting in a barrier); the tracker moves only when all were.
    _agree_on_error(error, root, tracker_path)
    if not _distributed() or dist.get_rank() == 0:
        try:
            atomic_write_text(tracker_path, str(state.iteration))
        except UserError as err:
            error = err
    _agree_on_error(error, root, tracker_path)
    log(f"  successfully saved checkpoint at iteration {state.iteration:7d} to {root}")


_swept = set()  # save directories this process has swept (every rank sweeps at the same save)


def _sweep_once(root, log):
    """At this process's first save to ``root``, remove what writers killed mid-save left
    there: they were dead processes, since a living one removes its own temporary files even
    when it fails; later saves skip the walk of a tree that may hold hundreds of iterations."""
    key = os.path.abspath(root)
    if key in _swept:
        return
    _swept.add(key)
    if _first_rank_on_this_host():
        remove_stale_temporaries(root, log)


def _first_rank_on_this_host():
    """Whether this process has the lowest global rank of its host (all-gathers the host
    names): the one that sweeps the host's stale temporary files, which only a process of
    the writer's host can judge (``megatron.checkpoint_files``)."""
    if not _distributed():
        return True
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts.index(socket.gethostname()) == dist.get_rank()


def _agree_on_error(error, root, tracker_path):
    """Raise a one-line UserError on every rank if ``error`` is set on any (a collective)."""
    failed = error is not None
    if _distributed():
        from megatron.parallel.initialize import comm_device

        flag = torch.tensor([1 if failed else 0], dtype=torch.int32, device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = bool(flag.item())
    if not failed:
        return
    if error is None:
        raise UserError(f"--save {root}: another rank could not write its checkpoint file "
                        "(see its error)")
    previous = "still names the previous checkpoint" if os.path.isfile(tracker_path) \
        else "was not written"
    raise UserError(f"--save {root}: {error}; {TRACKER_FILENAME} {previous}")


def _model_entry_names(model):
    """[(checkpoint key, chunk)]: Megatron's ``model``, or ``model0``, ``model1``, ... for the
    interleaved schedule's chunks (--num-layers-per-virtual-pipeline-stage)."""
    from megatron.parallel.pipeline_utils import model_chunks

    chunks = model_chunks(model)
    if len(chunks) == 1:
        return [("model", chunks[0])]
    return [(f"model{i}", chunk) for i, chunk in enumerate(chunks)]


def _chunk_count(ckpt):
    """Model chunks per pipeline stage in a checkpoint file's dict (1: a plain ``model``)."""
    from megatron.checkpoint_reshard import chunk_keys

    if not isinstance(ckpt, dict):
        return 1
    return len(chunk_keys(ckpt)) or 1


def _model_entries(model):
    return {key: _model_state_for_save(chunk) for key, chunk in _model_entry_names(model)}


def _saved_model_entries(ckpt, model, path):
    """[(chunk, its saved state)]; one line when the checkpoint's chunks are not this run's."""
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a Megatron checkpoint (no 'model' entry)")
    from megatron.checkpoint_reshard import chunk_keys

    names = _model_entry_names(model)
    saved_chunks = len(chunk_keys(ckpt))
    if len(names) > 1 and saved_chunks != len(names) or len(names) == 1 and saved_chunks:
        raise UserError(f"{path} holds {saved_chunks or 1} model chunk(s) per pipeline stage "
                        f"but this run builds {len(names)} (--num-layers-per-virtual-pipeline-"
                        f"stage must match the checkpoint's)")
    if not all(isinstance(ckpt.get(key), dict) for key, _ in names):
        raise UserError(f"{path} is not a Megatron checkpoint (no 'model' entry)")
    return [(chunk, ckpt[key]) for key, chunk in names]


def _model_state_for_save(model):
    """The model's own Megatron layout (``LanguageModule``), else the generic nesting."""
    if hasattr(model, "state_dict_for_save_checkpoint"):
        return model.state_dict_for_save_checkpoint()
    return megatron_model_state(model.state_dict())


_NOT_SHAPE = dict(hidden_dropout=0.0, attention_dropout=0.0, recompute_granularity=None,
                  sequence_parallel=False, params_dtype=torch.float32, init_seed=None)


def saved_model_config(ckpt_args, path):
    """(TransformerConfig, names of fields the args do not give) that a checkpoint's ``args``
    describe; (None, ()) when they describe no model (another kind of checkpoint).

    Megatron args of other tools may lack fields that are not shapes: ``seq_length`` falls back
    to ``max_position_embeddings``; a missing ``padded_vocab_size`` is not compared. Training
    settings (dropout, recompute, dtype) do not enter. Args of an architecture this model cannot
    compute (``--swiglu``, Megatron's ``--onnx-safe`` GeLU, an unknown position embedding...)
    are refused in one line."""
    if ckpt_args is None or getattr(ckpt_args, "num_layers", None) is None \
            or getattr(ckpt_args, "hidden_size", None) is None \
            or getattr(ckpt_args, "num_attention_heads", None) is None:
        return None, ()
    values = dict(vars(ckpt_args))
    unknown = []
    for name in ("padded_vocab_size", "max_position_embeddings"):
        if values.get(name) is None and not (name == "max_position_embeddings"
                                             and values.get("seq_length")):
            unknown.append(name)
    seq = values.get("max_position_embeddings") or values.get("seq_length") \
        or values.get("encoder_seq_length") or 1
    values.update(seq_length=seq, padded_vocab_size=values.get("padded_vocab_size") or 1)
    from megatron.arguments import transformer_config_from_args

    try:
        return transformer_config_from_args(argparse.Namespace(**values), **_NOT_SHAPE), unknown
    except UserError as err:
        raise UserError(f"checkpoint {path} holds a model this code cannot compute: {err}") \
            from None
    except (TypeError, AttributeError, KeyError, ValueError):
        return None, ()  # args of another kind of checkpoint: the tensor shapes are checked


_GELU = {"tanh": "the tanh-approximate GeLU (Megatron's --openai-gelu or its default fused "
                 "bias-GeLU)",
         "none": "the exact erf GeLU (--no-bias-gelu-fusion)"}
_GELU_FLAG = {"tanh": "drop --no-bias-gelu-fusion or pass --openai-gelu",
              "none": "pass --no-bias-gelu-fusion (without --openai-gelu)"}


def check_model_config(saved, given, path, skip=()):
    """A one-line UserError naming the first model-config field (``CHECKPOINT_FIELDS``) whose
    value in the checkpoint's config ``saved`` differs from the model's config ``given``; an
    MLP GeLU that differs is named with the flags that select it."""
    from megatron.model.config import CHECKPOINT_FIELDS

    for name, flag in CHECKPOINT_FIELDS.items():
        if name in skip:
            continue
        saved_value, given_value = getattr(saved, name), getattr(given, name)
        if saved_value == given_value:
            continue
        if name == "padded_vocab_size":
            raise UserError(f"checkpoint {path} has a padded vocabulary of {saved_value} but the "
                            f"tokenizer gives {given_value} (check --vocab-file/--tokenizer-type "
                            "and --make-vocab-size-divisible-by)")
        if name == "gelu_approximate":
            raise UserError(f"checkpoint {path} was saved with {_GELU[saved_value]} in its MLP "
                            f"but this run computes {_GELU[given_value]}: "
                            f"{_GELU_FLAG[saved_value]}")
        if isinstance(saved_value, bool):
            raise UserError(f"checkpoint {path} was saved with {flag} "
                            f"{'on' if saved_value else 'off'} but this run has it "
                            f"{'on' if given_value else 'off'}")
        default = " (it defaults to --seq-length)" if name == "max_position_embeddings" else ""
        raise UserError(f"checkpoint {path} was saved with {flag} {saved_value} but {flag} "
                        f"{given_value} was given{default}")


def check_resume_seq_length(ckpt_args, args, path):
    """A one-line UserError naming --seq-length when a resume gives another one than the
    checkpoint's and the checkpoint holds state counted in its sequences (our checkpoints: the
    random-LTD schedule, kept even by dense runs, and the layer-token counters). Checkpoints of
    Megatron-LM hold none and resume at another length, as there."""
    saved, given = getattr(ckpt_args, "seq_length", None), getattr(args, "seq_length", None)
    if saved is None or given is None or saved == given:
        return
    raise UserError(f"checkpoint {path} was saved with --seq-length {saved} but --seq-length "
                    f"{given} was given: a resume continues its schedules at that length (pass "
                    f"--seq-length {saved}, or --finetune to start anew from its weights)")


def check_head_gelu(saved, model, path):
    """BERT's LM head computes the tanh GeLU exactly when --openai-gelu is on (Megatron's
    BertLMHead): a checkpoint saved otherwise is refused by a model with that head."""
    head = getattr(model, "lm_head", None)
    given = getattr(head, "gelu_approximate", None)
    if saved is None or given is None or saved.lm_head_gelu_approximate == given:
        return
    what = {"tanh": "the tanh-approximate GeLU (--openai-gelu)",
            "none": "the exact erf GeLU (no --openai-gelu)"}
    raise UserError(f"checkpoint {path} was saved with {what[saved.lm_head_gelu_approximate]} "
                    f"in its BERT LM head but this run computes {what[given]}: "
                    f"{'pass' if saved.openai_gelu else 'drop'} --openai-gelu")


def check_shapes(ckpt_args, args, path, model=None):
    """A one-line UserError naming the first flag whose value differs from the checkpoint's
    (the model-config fields in ``megatron.model.config.CHECKPOINT_FIELDS``, and with
    ``model`` the GeLU of its BERT LM head), or the architecture the checkpoint needs that
    this model cannot compute."""
    saved, unknown = saved_model_config(ckpt_args, path)
    if saved is None:
        return
    from megatron.arguments import transformer_config_from_args

    check_model_config(saved, transformer_config_from_args(args), path, skip=unknown)
    check_head_gelu(saved, model, path)


def _prefixes(names):
    """Parameter names summarised by their module (``lm_head.dense.weight`` -> ``lm_head``)."""
    seen = []
    for name in names:
        head = name.split(".")[0]
        if head not in seen:
            seen.append(head)
    return seen or ["none"]


def _log_partial_load(path, missing, ignored, log):
    """The one line naming the heads a ``LoadPolicy`` ignored and left initialised."""
    if missing or ignored:
        log(f"  loaded model weights from {path} without {len(ignored)} entries this model does "
            f"not use ({', '.join(_prefixes(ignored))}); {len(missing)} parameters keep their "
            f"initialisation ({', '.join(_prefixes(missing))})")


def _check_layout(ckpt_args, args, path):
    for name, flag in (("tensor_model_parallel_size", "--tensor-model-parallel-size"),
                       ("pipeline_model_parallel_size", "--pipeline-model-parallel-size")):
        saved, given = getattr(ckpt_args, name, None), getattr(args, name, None)
        if saved is not None and given is not None and saved != given:
            raise UserError(f"checkpoint {path} was saved with {flag} {saved} but {flag} "
                            f"{given} was given; convert it with tools/checkpoint_util.py")


def _without_unused_head_copy(flat, model):
    """Drop a ``word_embeddings_for_head`` the model holds no copy for: a PP = 1 checkpoint of
    a tied model written by other Megatron tools may carry one, and Megatron's loader ignores
    it there."""
    from megatron.checkpoint_reshard import HEAD_COPY

    tied = getattr(model, "share_embeddings_and_output_weights", False)
    if HEAD_COPY in flat and tied and HEAD_COPY not in model.state_dict():
        return {k: v for k, v in flat.items() if k != HEAD_COPY}
    return flat


def _fit_vocab(full, ckpt_args, model, parallel, path, log):
    """The full state with its vocabulary rows padded or cut to this model's padded vocabulary
    (another tensor-parallel size pads the same vocabulary to another multiple). Refused in one
    line when no vocabulary pads to both sizes."""
    from megatron.checkpoint_reshard import is_vocab_parameter, resize_vocab

    padded = model.config.padded_vocab_size
    rows = next((t.shape[0] for n, t in full.items() if is_vocab_parameter(n)), padded)
    if rows == padded:
        return full
    multiple = getattr(ckpt_args, "make_vocab_size_divisible_by", None) or 128
    saved_slack = multiple * (getattr(ckpt_args, "tensor_model_parallel_size", None) or 1)
    slack = multiple * parallel.tp_size
    if max(rows - saved_slack, padded - slack) >= min(rows, padded):
        raise UserError(f"checkpoint {path} has a padded vocabulary of {rows} but this model "
                        f"{padded}: they do not pad one vocabulary (check --vocab-file/"
                        "--tokenizer-type and --make-vocab-size-divisible-by)")
    log(f"  vocabulary padding: {rows} rows in {path}, {padded} in this model "
        f"({'dropping' if rows > padded else 'adding zero'} padding rows)")
    return resize_vocab(full, padded)[0]


def load_pretrained_weights(root, model, parallel=None, policy=None, log=print,
                            flag="--pretrained-checkpoint", reading=ReadOptions()):
    """Load the model weights (nothing else) of the Megatron checkpoint directory ``root``,
    saved with any TP/PP layout, into this rank's ``model`` (its pipeline stage and tensor
    shard, ``parallel``; under --num-layers-per-virtual-pipeline-stage each of its model
    chunks); returns the checkpoint's ``args``.

    The checkpoint's model args must describe this model (``check_model_config``; the padded
    vocabulary may differ by padding only, see ``_fit_vocab``); ``policy`` (a ``LoadPolicy``)
    names the parameters it may lack or hold beyond this model (another head), reported in one
    line. Every rank reads the files itself (no collectives); ``reading``: how
    (``ReadOptions``: the --unsafe-load-checkpoint and --no-verify-checkpoint flags)."""
    from megatron.checkpoint_reshard import model_state_for_rank, read_full_model_state
    from megatron.parallel.pipeline_utils import model_chunks

    parallel = parallel or ParallelState()
    chunks = model_chunks(_unwrap(model))  # one, or the interleaved schedule's chunks
    full, ckpt_args = read_full_model_state(root, flag=flag, reading=reading)
    saved, unknown = saved_model_config(ckpt_args, root)
    if saved is not None:
        check_model_config(saved, chunks[0].config, root, skip=("padded_vocab_size", *unknown))
        for chunk in chunks:
            check_head_gelu(saved, chunk, root)
    full = _fit_vocab(full, ckpt_args, chunks[0], parallel, root, log)
    for chunk in chunks:  # each its global layers, embeddings and heads where it has them
        state = model_state_for_rank(full, chunk, parallel)
        missing, ignored = load_flat_state(chunk, state, root, policy)
        _log_partial_load(root, missing, ignored, log)
    log(f"  loaded model weights from {root} into tensor rank {parallel.tp_rank} of "
        f"{parallel.tp_size}, pipeline stage {parallel.pp_rank} of {parallel.pp_size}")
    return ckpt_args


def _optimizer_state(ckpt):
    """The checkpoint's optimizer state, None when it holds none or a placeholder (a
    model-only checkpoint: None, an empty dict)."""
    opt = ckpt.get("optimizer")
    return opt if isinstance(opt, dict) and opt else None


def _load_weights_from_other_layout(root, iteration, why, model, parallel, policy, log,
                                    reading):
    """--finetune (or a release) from a checkpoint whose layout is not this run's (``why``):
    the weights go through the full model (``load_pretrained_weights``); iteration 0."""
    log(f"loading model weights from {root} at iteration {iteration} ({why})")
    ckpt_args = load_pretrained_weights(root, model, parallel, policy, log, flag="--load",
                                        reading=reading)
    log(f"  loaded model weights from {root} (finetune: starting from iteration 0)")
    return TrainState(), {"args": ckpt_args, "iteration": iteration}


def load_checkpoint(args, model, optimizer, scheduler, tracker=None, log=print, parallel=None,
                    policy=None):
    """Load ``--load`` if it holds a checkpoint; returns (TrainState, the checkpoint dict).

    With ``--finetune`` (or a release checkpoint) only the model weights are loaded, from any
    TP/PP layout, and the counters start from zero. ``parallel``: this rank's layout (reads its
    (tp, pp) file and its DP entry of the RNG states). ``policy``: a ``LoadPolicy`` naming the
    parameters the checkpoint may lack or hold beyond this model (weights of another head);
    default strict.
    """
    parallel = parallel or ParallelState()
    model = _unwrap(model)
    root = args.load
    reading = ReadOptions.from_args(args)
    if root is None:
        return TrainState(), None
    if os.path.exists(root) and not os.path.isdir(root):  # else "training from scratch" below
        raise UserError(f"--load {root}: not a directory (expected a checkpoint directory)")
    found = read_tracker(root)
    if found is None:
        if args.exit_on_missing_checkpoint:
            raise UserError(f"--load {root}: no {TRACKER_FILENAME} found")
        log(f"WARNING: could not find a checkpoint in {root} "
            f"(no {TRACKER_FILENAME}); training from scratch")
        return TrainState(), None
    iteration, release = found
    weights_only = args.finetune or release
    layout = saved_layout(iteration_dir(root, iteration, release))
    given = (parallel.tp_size, parallel.pp_size)
    if weights_only and layout is not None and layout != given:
        return _load_weights_from_other_layout(
            root, iteration, f"saved with TP {layout[0]} x PP {layout[1]}, this run TP "
            f"{given[0]} x PP {given[1]}", model, parallel, policy, log, reading)
    path = checkpoint_file(root, iteration, parallel.tp_rank, parallel.pp_rank, parallel.pp_size,
                           release=release)
    if not os.path.isfile(path):
        if layout is not None and layout != given:
            raise UserError(
                f"checkpoint {iteration_dir(root, iteration, release)} was saved with "
                f"--tensor-model-parallel-size {layout[0]} --pipeline-model-parallel-size "
                f"{layout[1]} but this run has {given[0]} and {given[1]}; convert it with "
                "tools/checkpoint_util.py (or load its weights only with --finetune)")
        raise UserError(f"{os.path.join(root, TRACKER_FILENAME)} names "
                        f"{'release' if release else f'iteration {iteration}'} "
                        f"but {path} does not exist")
    log(f"loading checkpoint from {root} at iteration {iteration}")
    ckpt = read_checkpoint_file(path, reading)
    saved_chunks, run_chunks = _chunk_count(ckpt), len(_model_entry_names(model))
    if weights_only and saved_chunks != run_chunks:
        # the same TP x PP, other model chunks (--num-layers-per-virtual-pipeline-stage)
        return _load_weights_from_other_layout(
            root, iteration, f"saved with {saved_chunks} model chunk(s) per pipeline stage, "
            f"this run {run_chunks}", model, parallel, policy, log, reading)
    entries = _saved_model_entries(ckpt, model, path)
    _check_layout(ckpt.get("args"), args, path)
    if not weights_only and "random_ltd_scheduler" in ckpt:
        check_resume_seq_length(ckpt.get("args"), args, path)
    check_shapes(ckpt.get("args"), args, path, entries[-1][0])  # the last chunk has the heads
    for chunk, saved in entries:
        flat = _without_unused_head_copy(flat_model_state(saved), chunk)
        missing, ignored = load_flat_state(chunk, flat, path, policy)
        _log_partial_load(path, missing, ignored, log)

    if weights_only:
        log(f"  loaded model weights from {path} (finetune: starting from iteration 0)")
        return TrainState(), ckpt

    state = TrainState(**ckpt["train_state"]) if "train_state" in ckpt else TrainState(
        iteration=ckpt.get("iteration", ckpt.get("total_iters", 0)),
        consumed_train_samples=getattr(ckpt.get("args"), "consumed_train_samples", 0),
        consumed_valid_samples=getattr(ckpt.get("args"), "consumed_valid_samples", 0),
        consumed_train_tokens=ckpt.get("tokens", 0))
    if not args.no_load_optim:
        _load_optimizer(ckpt, optimizer, scheduler, path)
    if not args.no_load_rng:
        _load_rng(ckpt, tracker, parallel, path, log)
    log(f"  successfully loaded checkpoint from {root} at iteration {state.iteration}")
    return state, ckpt


def _load_optimizer(ckpt, optimizer, scheduler, path):
    """Optimizer and LR-scheduler state; one line when the checkpoint holds none (a model-only
    checkpoint) or one that does not fit this run's optimizer."""
    opt_state = _optimizer_state(ckpt)
    if opt_state is None:
        raise UserError(f"{path} holds no optimizer state (a model-only checkpoint, e.g. saved "
                        "with --no-save-optim or converted by tools/checkpoint_util.py); pass "
                        "--no-load-optim or --finetune")
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as err:
        text = str(err).strip().splitlines()
        raise UserError(f"{path}: its optimizer state does not fit this run's optimizer "
                        f"({type(err).__name__}: {text[0] if text else 'no detail'}); pass "
                        "--no-load-optim to start a fresh optimizer") from None
    sched_state = ckpt.get("opt_param_scheduler", ckpt.get("lr_scheduler"))
    if sched_state is not None:
        scheduler.load_state_dict(sched_state)


def _load_rng(ckpt, tracker, parallel, path, log):
    """This DP rank's RNG states (entry 0, with a warning, when the DP size changed)."""
    rng = ckpt.get("rng_state")
    if not rng:
        raise UserError(f"{path} holds no RNG state (saved with --no-save-rng); "
                        "pass --no-load-rng")
    if isinstance(rng, dict):  # a single entry
        rng = [rng]
    if len(rng) == parallel.dp_size:
        entry = rng[parallel.dp_rank]
    else:
        entry = rng[0]
        if parallel.dp_rank == 0:
            log(f"WARNING: {path} holds the RNG states of {len(rng)} data-parallel ranks, "
                f"this run has {parallel.dp_size}; every data-parallel rank continues from "
                "those of rank 0")
    set_rng_state(entry, tracker)
