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
checkpoint.

Parallel runs (``parallel=`` a ParallelState), as Megatron: every (tp, pp) rank has its own file;
data-parallel rank 0 of each writes it, with ``rng_state`` the list of every DP rank's RNG states
(all-gathered over DP); the ranks agree that every file was written (else all raise one
UserError naming the file, and the tracker keeps naming the previous checkpoint); then global
rank 0 replaces the tracker. The ``optimizer``
entry is the full torch state even with --use-distributed-optimizer (consolidated over DP, see
``megatron.optim.distributed``), so a run resumes with any DP size. Loading reads this rank's
file and its DP entry of ``rng_state`` (entry 0, with a warning, when the DP size changed).
Another TP/PP layout needs ``tools/checkpoint_util.py``.
"""

import dataclasses
import os
import re

import torch
import torch.distributed as dist

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


def read_checkpoint_file(path):
    """``torch.load`` of one ``model_optim_rng.pt``; a truncated or foreign file (torch raises
    anything from RuntimeError to UnpicklingError, some with several lines) becomes a one-line
    UserError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        text = str(err).strip()
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: "
                        f"{text.splitlines()[0] if text else 'unreadable'}") from None


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path, err):
    reason = getattr(err, "strerror", None)
    if not reason:
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
    return UserError(f"cannot write {path}: {reason}")


def _remove_quietly(path):
    try:
        if os.path.exists(path):
            os.remove(path)
    except OSError:
        pass


def atomic_torch_save(obj, path):
    """torch.save to ``path.tmp``, fsync, rename: ``path`` is either absent or complete.

    A file system error (not writable, not a directory, disk full) is a one-line UserError
    naming the file; the temporary file is removed and an existing ``path`` is left as it was.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        # A full disk surfaces from torch's zip writer as a RuntimeError ("enforce fail at
        # inline_container.cc") raised while handling the OSError: report the OSError.
        cause = err
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None and "inline_container" not in str(err) and "write" not in str(err):
            raise
        raise _write_error(path, cause or err) from None
    finally:
        _remove_quietly(tmp)
    _fsync_dir(os.path.dirname(path))


def check_save_dir(root):
    """Fail at start-up, not at the first save hours later, when ``--save`` cannot be written:
    create the directory and a probe file in it (removed again). One-line UserError."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"--save {root}: cannot write checkpoints there: Not a directory")
    probe = os.path.join(root, f".write_probe.{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"--save {root}: cannot write checkpoints there: {reason}") from None
    finally:
        _remove_quietly(probe)


def atomic_write_text(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise _write_error(path, err) from None
    finally:
        _remove_quietly(tmp)
    _fsync_dir(os.path.dirname(path))


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
        "model": _model_state_for_save(_unwrap(model)),
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


def _model_state_for_save(model):
    """The model's own Megatron layout (``LanguageModule``), else the generic nesting."""
    if hasattr(model, "state_dict_for_save_checkpoint"):
        return model.state_dict_for_save_checkpoint()
    return megatron_model_state(model.state_dict())


def check_shapes(ckpt_args, args, path):
    """A one-line UserError naming the first flag whose value differs from the checkpoint's
    (the model-config fields in ``megatron.model.config.CHECKPOINT_FIELDS``)."""
    if ckpt_args is None or getattr(ckpt_args, "num_layers", None) is None:
        return
    from megatron.arguments import transformer_config_from_args
    from megatron.model.config import CHECKPOINT_FIELDS

    try:
        saved_cfg = transformer_config_from_args(ckpt_args)
    except (UserError, TypeError, AttributeError, KeyError):
        return  # args of another kind of checkpoint: the tensor shapes are checked on load
    given_cfg = transformer_config_from_args(args)
    for name, flag in CHECKPOINT_FIELDS.items():
        saved, given = getattr(saved_cfg, name), getattr(given_cfg, name)
        if saved == given:
            continue
        if name == "padded_vocab_size":
            raise UserError(f"checkpoint {path} has a padded vocabulary of {saved} but the "
                            f"tokenizer gives {given} (check --vocab-file/--tokenizer-type "
                            "and --make-vocab-size-divisible-by)")
        if isinstance(saved, bool):
            raise UserError(f"checkpoint {path} was saved with {flag} {'on' if saved else 'off'}"
                            f" but this run has it {'on' if given else 'off'}")
        raise UserError(f"checkpoint {path} was saved with {flag} {saved} but {flag} "
                        f"{given} was given")


def _prefixes(names):
    """Parameter names summarised by their module (``lm_head.dense.weight`` -> ``lm_head``)."""
    seen = []
    for name in names:
        head = name.split(".")[0]
        if head not in seen:
            seen.append(head)
    return seen or ["none"]


def _check_layout(ckpt_args, args, path):
    for name, flag in (("tensor_model_parallel_size", "--tensor-model-parallel-size"),
                       ("pipeline_model_parallel_size", "--pipeline-model-parallel-size")):
        saved, given = getattr(ckpt_args, name, None), getattr(args, name, None)
        if saved is not None and given is not None and saved != given:
            raise UserError(f"checkpoint {path} was saved with {flag} {saved} but {flag} "
                            f"{given} was given; convert it with tools/checkpoint_util.py")


def load_checkpoint(args, model, optimizer, scheduler, tracker=None, log=print, parallel=None,
                    policy=None):
    """Load ``--load`` if it holds a checkpoint; returns (TrainState, the checkpoint dict).

    With ``--finetune`` (or a release checkpoint) only the model weights are loaded and the
    counters start from zero. ``parallel``: this rank's layout (reads its (tp, pp) file and its
    DP entry of the RNG states). ``policy``: a ``LoadPolicy`` naming the parameters the
    checkpoint may lack or hold beyond this model (weights of another head); default strict.
    """
    parallel = parallel or ParallelState()
    model = _unwrap(model)
    root = args.load
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
    path = checkpoint_file(root, iteration, parallel.tp_rank, parallel.pp_rank, parallel.pp_size,
                           release=release)
    if not os.path.isfile(path):
        layout = saved_layout(iteration_dir(root, iteration, release))
        given = (parallel.tp_size, parallel.pp_size)
        if layout is not None and layout != given:
            raise UserError(
                f"checkpoint {iteration_dir(root, iteration, release)} was saved with "
                f"--tensor-model-parallel-size {layout[0]} --pipeline-model-parallel-size "
                f"{layout[1]} but this run has {given[0]} and {given[1]}; convert it with "
                "tools/checkpoint_util.py")
        raise UserError(f"{os.path.join(root, TRACKER_FILENAME)} names "
                        f"{'release' if release else f'iteration {iteration}'} "
                        f"but {path} does not exist")
    log(f"loading checkpoint from {root} at iteration {iteration}")
    ckpt = read_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a Megatron checkpoint (no 'model' entry)")
    _check_layout(ckpt.get("args"), args, path)
    check_shapes(ckpt.get("args"), args, path)
    missing, ignored = load_flat_state(model, flat_model_state(ckpt["model"]), path, policy)
    if missing or ignored:
        log(f"  loaded model weights from {path} without {len(ignored)} entries this model does "
            f"not use ({', '.join(_prefixes(ignored))}); {len(missing)} parameters keep their "
            f"initialisation ({', '.join(_prefixes(missing))})")

    if args.finetune or release:
        log(f"  loaded model weights from {path} (finetune: starting from iteration 0)")
        return TrainState(), ckpt

    state = TrainState(**ckpt["train_state"]) if "train_state" in ckpt else TrainState(
        iteration=ckpt.get("iteration", ckpt.get("total_iters", 0)),
        consumed_train_samples=getattr(ckpt.get("args"), "consumed_train_samples", 0),
        consumed_valid_samples=getattr(ckpt.get("args"), "consumed_valid_samples", 0),
        consumed_train_tokens=ckpt.get("tokens", 0))
    if not args.no_load_optim:
        if "optimizer" not in ckpt:
            raise UserError(f"{path} holds no optimizer state (saved with --no-save-optim); "
                            "pass --no-load-optim or --finetune")
        optimizer.load_state_dict(ckpt["optimizer"])
        sched_state = ckpt.get("opt_param_scheduler", ckpt.get("lr_scheduler"))
        if sched_state is not None:
            scheduler.load_state_dict(sched_state)
    if not args.no_load_rng:
        rng = ckpt.get("rng_state")
        if rng is None:
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
    log(f"  successfully loaded checkpoint from {root} at iteration {state.iteration}")
    return state, ckpt
