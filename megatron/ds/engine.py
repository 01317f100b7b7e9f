"""``--deepspeed``: train our model through DeepSpeed's engine (ZeRO 1/2/3, its fp16/bf16).

As Megatron-DeepSpeed drives it: our model and a plain torch AdamW over Megatron's parameter
groups go to ``deepspeed.initialize`` with the run's JSON (``megatron.ds.config.engine_config``)
and an ``mpu`` built from our ``ParallelState``; the engine owns the gradient reduction, ZeRO
sharding, loss scaling and clipping. Everything else is ours and unchanged: data, random-LTD
(configured from the same JSON's ``data_efficiency`` section), the schedule over micro-batches,
the LR schedule (stepped by our loop with Megatron's increments, on the param groups the engine
keeps), logging, exit conditions.

The seam with the loop is two objects:

- ``EngineOptimizer``: what the loop and the LR scheduler know of an optimizer (param groups,
  ``step() -> (applied, grad norm, None)``, the loss scale), plus ``backward(loss)`` for the
  schedule: ``engine.backward`` with the gradient-accumulation boundary set on the step's last
  micro-batch (the loss is already divided by the number of micro-batches);
- ``DeepSpeedStepRunner``: a ``StepRunner`` whose step runs through them and whose checkpoints
  are the engine's (``save_checkpoint`` / ``load_checkpoint``).

Checkpoints are DeepSpeed's layout (``<save>/global_step<N>/mp_rank_00_model_states.pt``,
``*_optim_states.pt``, ``latest``), so DeepSpeed's tools read them, with our loop's state as the
engine's client state (Megatron-DeepSpeed's keys: ``args``, ``iteration``, ``tokens``, RNG
states, the LR scheduler) plus ``train_state`` and the random-LTD scheduler. They are written
under a temporary tag and renamed when complete; ``latest`` and
``latest_checkpointed_iteration.txt`` are replaced last. Files are read as ours are: their
recorded CRC-32s checked (unless ``--no-verify-checkpoint``), then ``torch.load(weights_only=True)``
with the checkpoint allowlist (``safe_checkpoint_engine``).
``tools/convert_deepspeed_checkpoint.py`` converts to and from our native layout.

With the JSON's ``zero_optimization.offload_optimizer`` (ZeRO-Offload) the engine refuses a
torch optimizer, so DeepSpeed's CPU AdamW takes the same groups (``_cpu_adam``).

Not here (refused in one line by ``megatron.ds.config``): DeepSpeed's pipeline engine (pass
``--no-pipeline-parallel``), sequence parallelism, ``--pretrained-checkpoint``.
"""

import dataclasses
import os
import shutil
import warnings

import torch
import torch.distributed as dist

from megatron.errors import UserError


def import_deepspeed():
    """DeepSpeed, or one line saying how to install it (CPU: DS_ACCELERATOR=cpu)."""
    try:
        import deepspeed
    except ImportError:
        raise UserError("--deepspeed needs DeepSpeed: pip install deepspeed (on a machine "
                        "without GPUs also set DS_ACCELERATOR=cpu)") from None
    return deepspeed


def start_single_process_group():
    """DeepSpeed's engine needs torch.distributed even for one process: a one-rank gloo group
    on an in-memory store (no port). It stays for the life of the process: DeepSpeed caches
    its groups module-wide, so a second run in the same process needs the same group."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class ParallelStateMpu:
    """Megatron's ``mpu`` interface, which DeepSpeed calls for its groups, from our
    ``ParallelState``. With the pipeline engine out, the model-parallel group is the
    tensor-parallel one. DeepSpeed needs a real group where ours is None (size 1), so those
    are created here, once per rank, collectively (every rank calls ``new_group`` for every
    singleton in the same order)."""

    def __init__(self, parallel):
        self.parallel = parallel
        singletons = {}
        if dist.get_world_size() > 1 and (parallel.tp_group is None or parallel.dp_group is None):
            for rank in range(dist.get_world_size()):
                group = dist.new_group([rank])
                if rank == dist.get_rank():
                    singletons = {"tp": group, "dp": group}
        self._tp_group = parallel.tp_group or singletons.get("tp")
        self._dp_group = parallel.dp_group or singletons.get("dp")

    def get_model_parallel_rank(self):
        return self.parallel.tp_rank

    def get_model_parallel_world_size(self):
        return self.parallel.tp_size

    def get_model_parallel_group(self):
        return self._tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return self.parallel.tp_ranks[0]

    def get_data_parallel_rank(self):
        return self.parallel.dp_rank

    def get_data_parallel_world_size(self):
        return self.parallel.dp_size

    def get_data_parallel_group(self):
        return self._dp_group

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0


class EngineOptimizer:
    """The loop's optimizer interface over DeepSpeed's engine (see the module docstring)."""

    def __init__(self, engine):
        self.engine = engine
        self.optimizer = engine.optimizer
        self._micro_batches = 1
        self._backwards = 0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def begin_step(self, micro_batches, batch_size):
        """Before a step of ``micro_batches`` backwards over ``batch_size`` samples (under
        --rampup-batch-size the engine's batch follows ours)."""
        self._micro_batches, self._backwards = micro_batches, 0
        if batch_size != self.engine.train_batch_size():
            self.engine.set_train_batch_size(batch_size)

    def backward(self, loss):
        """The engine's backward; its gradient reduction runs on the step's last micro-batch.
        ``loss`` is already divided by the number of micro-batches (our schedule)."""
        self._backwards += 1
        self.engine.set_gradient_accumulation_boundary(self._backwards == self._micro_batches)
        self.engine.backward(loss, scale_wrt_gas=False)

    def scale_loss(self, loss):
        return loss  # the engine scales in ``backward``

    def zero_grad(self, set_to_none=True):
        pass  # the engine zeroes the gradients after its step

    def step(self):
        """-> (update applied, gradient norm or None, None)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            norm = float(norm)
        return bool(self.engine.was_step_applied()), norm, None

    def get_loss_scale(self):
        scale = getattr(self.optimizer, "cur_scale", None)
        if scale is None:
            scale = getattr(self.optimizer, "loss_scale", 1.0)
        return torch.tensor([float(scale)])

    def reload_model_params(self):
        pass


def build_engine(args, model, parallel, log):
    """``deepspeed.initialize`` over ``model`` with Megatron's parameter groups in a torch
    AdamW/SGD (the same one the native path builds, unwrapped); -> ``EngineOptimizer``."""
    from megatron.checkpoint_files import ReadOptions
    from megatron.ds.config import engine_config
    from megatron.optim import build_optimizer
    from megatron.parallel.initialize import read_distributed_env

    deepspeed = import_deepspeed()
    _check_precision_supported(args, deepspeed.accelerator.get_accelerator())
    # The bare torch optimizer (no fp16 wrapper, no ZeRO-1, no clipping): the engine does those.
    bare = build_optimizer(model, args=None, optimizer=args.optimizer, lr=args.lr,
                           weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
                           adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                           sgd_momentum=args.sgd_momentum, clip_grad=0.0, log=log).optimizer
    config = engine_config(args, parallel.dp_size)
    offload = offloaded_optimizer(config)
    if offload is not None:
        bare = _cpu_adam(args, bare, offload)
    # DeepSpeed's ZeRO calls a torch collective torch now names deprecated, once per step
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated",
                            category=FutureWarning)
    # DeepSpeed reads LOCAL_RANK, which torchrun sets and srun does not (SLURM_LOCALID)
    os.environ.setdefault("LOCAL_RANK", str(read_distributed_env().local_rank))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=bare, config=config, dist_init_required=False,
        mpu=ParallelStateMpu(parallel) if dist.get_world_size() > 1 else None)
    engine.checkpoint_engine = safe_checkpoint_engine(ReadOptions.from_args(args))
    log(f" > DeepSpeed {deepspeed.__version__} engine: ZeRO stage "
        f"{config['zero_optimization']['stage']}, "
        f"{'fp16' if args.fp16 else 'bf16' if args.bf16 else 'fp32'}, gradient accumulation "
        f"{config['gradient_accumulation_steps']}, clipping {config['gradient_clipping']}")
    return EngineOptimizer(engine)


def offloaded_optimizer(config):
    """Where the engine's config offloads the optimizer ('cpu' or 'nvme'), or None."""
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
    return device if device not in (None, "none") else None


def _cpu_adam(args, bare, device):
    """ZeRO-Offload steps the optimizer on the CPU and refuses a torch one: DeepSpeed's CPU
    AdamW over the same parameter groups, as Megatron-DeepSpeed's ``--cpu-optimizer``."""
    if args.optimizer != "adam":
        raise UserError(f"--optimizer {args.optimizer} with --deepspeed-config "
                        f"zero_optimization.offload_optimizer on {device!r}: ZeRO-Offload steps "
                        "DeepSpeed's CPU Adam; use --optimizer adam, or remove the offload")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(bare.param_groups, lr=args.lr, weight_decay=args.weight_decay,
                            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                            adamw_mode=True)


def _check_precision_supported(args, accelerator):
    """DeepSpeed's CPU accelerator runs fp16 only where oneDNN has fp16 kernels (recent Xeons);
    elsewhere the engine stops with a ValueError traceback: refuse it here in one line."""
    if args.fp16 and not accelerator.is_fp16_supported():
        raise UserError(f"--fp16 (or the DeepSpeed JSON's fp16.enabled) with --deepspeed: "
                        f"DeepSpeed's {accelerator.device_name()} accelerator does not support "
                        "fp16 on this machine; use --bf16 or fp32, or leave --deepspeed out "
                        "for our fp16 path")
    if args.bf16 and not accelerator.is_bf16_supported():
        raise UserError(f"--bf16 (or the DeepSpeed JSON's bf16.enabled) with --deepspeed: "
                        f"DeepSpeed's {accelerator.device_name()} accelerator does not support "
                        "bf16 on this machine; use fp32, or leave --deepspeed out")


def _safe_globals():
    """Objects DeepSpeed's own checkpoint files hold beyond tensors and containers (its loss
    scaler records, the ZeRO stage enum, the (start, numel) records of flat-buffer fragments),
    allowed for the weights-only reader: plain records, restored without running their code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine(reading):
    """DeepSpeed's TorchCheckpointEngine writing the zip format and reading through
    ``read_checkpoint_file`` with ``reading`` (a ``ReadOptions``), as every other checkpoint:
    the zip directory's sizes and CRC-32s checked first (``--no-verify-checkpoint`` skips it),
    then weights only, with the checkpoint allowlist plus ``_safe_globals``. The zip format is
    what records the CRC-32s and lets a reader list a file's objects before unpickling."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from megatron.checkpoint_files import read_checkpoint_file

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def __init__(self):
            super().__init__(None)
            self.zipfile_serialization = True

        def load(self, path, map_location=None):
            with torch.serialization.safe_globals(_safe_globals()):
                return read_checkpoint_file(path, reading)

    return SafeCheckpointEngine()


# -- the step and the checkpoints ------------------------------------------------------------------

TAG_FORMAT = "global_step{}"  # DeepSpeed's and Megatron-DeepSpeed's tag


def step_runner_class():
    """``DeepSpeedStepRunner`` (defined on first use: megatron.training imports this module
    lazily, so the subclass cannot be defined at import time without a cycle)."""
    from megatron.training import StepRunner

    class DeepSpeedStepRunner(StepRunner):
        """A ``StepRunner`` whose ``wrapped`` model is the engine and whose optimizer is an
        ``EngineOptimizer``: gradients, their reduction and the loss scale are the engine's."""

        def __post_init__(self):
            self.main_grads = False  # the engine keeps its own fp32 gradients

        @property
        def loss_backward(self):
            return self.optimizer.backward

        def train_step(self, data_iterator, token_drop=None, batch_size=None):
            batch_size = batch_size or self.args.global_batch_size
            micro_batches = batch_size // (self.args.micro_batch_size * self.parallel.dp_size)
            self.model.train()
            self.optimizer.begin_step(micro_batches, batch_size)
            losses = self._schedule(data_iterator, token_drop, forward_only=False,
                                    num_microbatches=micro_batches)
            update_successful, grad_norm, self.num_zeros = self.optimizer.step()
            return losses, update_successful, grad_norm

        def save_checkpoint(self, state, scheduler, log, extra_state):
            save_engine_checkpoint(self.args, state, self.optimizer.engine, scheduler,
                                   self.parallel, log, extra_state)

    return DeepSpeedStepRunner


def _client_state(args, state, scheduler, parallel, extra_state):
    """What Megatron-DeepSpeed puts in the engine's client state, plus our loop's counters."""
    from megatron.checkpointing import CHECKPOINT_VERSION, _gather_rng_states

    args.consumed_train_samples = state.consumed_train_samples
    args.consumed_valid_samples = state.consumed_valid_samples
    args.consumed_train_tokens = state.consumed_train_tokens
    client = {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
              "iteration": state.iteration, "tokens": state.consumed_train_tokens,
              "train_state": dataclasses.asdict(state),
              "opt_param_scheduler": scheduler.state_dict()}
    if not args.no_save_rng:
        client["rng_state"] = _gather_rng_states(parallel.rng_tracker, parallel)
    client.update(extra_state or {})
    return client


def save_engine_checkpoint(args, state, engine, scheduler, parallel, log, extra_state=None):
    """``engine.save_checkpoint`` under a temporary tag, renamed to ``global_step<N>`` once every
    rank wrote its files; then ``latest`` and ``latest_checkpointed_iteration.txt``."""
    from megatron.checkpoint_files import atomic_write_text
    from megatron.checkpointing import TRACKER_FILENAME

    root, tag = args.save, TAG_FORMAT.format(state.iteration)
    log(f"saving DeepSpeed checkpoint at iteration {state.iteration:7d} to {root}")
    client = _client_state(args, state, scheduler, parallel, extra_state)
    temporary = f"{tag}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(os.path.join(root, temporary), ignore_errors=True)  # a killed save's
    dist.barrier()
    engine.save_checkpoint(root, tag=temporary, client_state=client, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        final = os.path.join(root, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(os.path.join(root, temporary), final)
        atomic_write_text(os.path.join(root, "latest"), tag)
        atomic_write_text(os.path.join(root, TRACKER_FILENAME), str(state.iteration))
    dist.barrier()
    log(f"  successfully saved DeepSpeed checkpoint at iteration {state.iteration:7d} to {root}")


def load_engine_checkpoint(args, engine, scheduler, parallel, log):
    """--load of an engine checkpoint: -> (TrainState, client state) or (TrainState(), None)
    when --load holds none. A native checkpoint there is refused with the conversion tool."""
    from megatron.checkpointing import TrainState, _load_rng, read_tracker

    root = args.load
    if root is None:
        return TrainState(), None
    if not os.path.isfile(os.path.join(root, "latest")):
        if read_tracker(root) is not None:
            raise UserError(f"--load {root} holds a native checkpoint; --deepspeed loads "
                            "DeepSpeed's layout: convert it with tools/convert_deepspeed_"
                            "checkpoint.py to-deepspeed, or leave --deepspeed out")
        if args.exit_on_missing_checkpoint:
            raise UserError(f"--load {root}: no DeepSpeed 'latest' file found")
        log(f"WARNING: could not find a DeepSpeed checkpoint in {root} (no 'latest'); "
            "training from scratch")
        return TrainState(), None
    path, client = engine.load_checkpoint(
        root, load_optimizer_states=not (args.no_load_optim or args.finetune),
        load_lr_scheduler_states=False, load_module_only=bool(args.finetune))
    if path is None:
        raise UserError(f"--load {root}: DeepSpeed could not load the checkpoint 'latest' names")
    if args.finetune:
        log(f"  loaded model weights from {path} (finetune: starting from iteration 0)")
        return TrainState(), None
    state = TrainState(**client["train_state"])
    if not args.no_load_optim:
        scheduler.load_state_dict(client["opt_param_scheduler"])
    if not args.no_load_rng:
        _load_rng(client, parallel.rng_tracker, parallel, path, log)
    log(f"  successfully loaded DeepSpeed checkpoint from {root} at iteration {state.iteration}")
    return state, client
