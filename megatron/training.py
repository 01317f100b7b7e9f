"""The pretraining loop: setup, train_step, evaluate, exit conditions, checkpoints.

Entry points (``pretrain_gpt.py``, ``pretrain_bert.py``, ``tasks/``) hand the loop a
``Provider``, everything that is theirs, and call ``pretrain``:

- ``model(args, parallel) -> LanguageModule``: this rank's part of the model;
- ``datasets(args, tokenizer, num_samples) -> (train, valid, test)`` where ``num_samples`` is
  the (train, valid, test) target size in samples;
- ``forward_step(args, tokenizer) -> forward_step`` with Megatron's narrow contract
  ``forward_step(data_iterator, model, token_drop=None) -> (output_tensor, loss_func)`` and
  ``loss_func(output_tensor) -> (loss, {name: value})``: the named losses (``lm loss``,
  ``sop loss``, ...) are logged, averaged and written to TensorBoard by name. ``token_drop`` is
  None (evaluation, or random-LTD off) or what ``megatron.ltd.driver.token_drop_for_batch``
  turns into the micro-batch's ``TokenDropState`` given the batch's sample ids (the ``'index'``
  field) and its special-token and padding masks;
- ``flops_per_sample(args, kept_lengths)``: model FLOPs of one sample's forward and backward
  (the TFLOP/s of the log line);
- ``load_policy``: which parameters a ``--load`` checkpoint may lack or hold beyond the model;
- ``check_args(args)``: the family's own flag checks.

``pretrain(datasets_provider, model_provider, forward_step_provider)``, Megatron's form, still
works and means a GPT-like provider.
"""

import argparse
import dataclasses
import math
import signal
import time
from collections.abc import Sequence

import torch

from megatron.arguments import params_torch_dtype, parse_args
from megatron.batch_rampup import current_global_batch_size, train_iters_for_samples
from megatron.checkpointing import TrainState, check_save_dir, load_checkpoint, save_checkpoint
from megatron.dist_signal_handler import (DistributedSignalHandler, end_data_workers,
                                          exit_signals)
from megatron.errors import USER_ERROR_STATUS, UserError
from megatron.initialize import (default_distributed_backend, select_device,
                                 set_random_seed)
from megatron.optim import OptimizerParamScheduler, build_optimizer, scheduler_steps_from_args
from megatron.parallel.data_parallel import (OverlappedGradReducer, attach_main_grads,
                                             is_data_parallel, no_sync_factory,
                                             wrap_data_parallel, zero_main_grads)
from megatron.parallel.heartbeat import Heartbeat
from megatron.parallel.initialize import (BackendFailureWatch, build_parallel_state,
                                          comm_device, communication_failure,
                                          init_process_group, known_process_groups,
                                          read_distributed_env)
from megatron.parallel.layers import allreduce_sequence_parallel_grads
from megatron.parallel.pipeline_utils import (allreduce_embedding_grads, build_model_chunks,
                                              initialize_embedding_tie)
from megatron.parallel.random import build_rng_tracker
from megatron.parallel.schedules import forward_backward
from megatron.parallel.state import ParallelState
from megatron.training_log import TrainingLogger
from megatron.utils import print_rank_0


def transformer_flops_per_sample(args, kept_lengths=None):
    """Model FLOPs of one sample (Narayanan et al. 2021, eq. 3; 72 without recompute), the LM
    head over every position; under random-LTD the dropping layers counted at their kept
    lengths ``{layer id: r}``. GPT's and BERT's (whose pooler and binary head are negligible)."""
    from megatron.model.utils import gpt_flops_per_iteration

    return gpt_flops_per_iteration(1, args.seq_length, args.num_layers, args.hidden_size,
                                   args.padded_vocab_size, ffn_hidden_size=args.ffn_hidden_size,
                                   kept_lengths=kept_lengths,
                                   recompute=args.recompute_granularity == "full")


@dataclasses.dataclass(frozen=True)
class Provider:
    """What an entry point gives the training loop (see the module docstring)."""

    model: object
    """(args, parallel) -> this rank's model (a ``megatron.model.LanguageModule``)."""
    datasets: object
    """(args, tokenizer, (train, valid, test) sample targets) -> (train, valid, test)."""
    forward_step: object
    """(args, tokenizer) -> forward_step(data_iterator, model, token_drop=None)."""
    flops_per_sample: object = transformer_flops_per_sample
    """(args, kept_lengths or None) -> FLOPs of one sample's forward and backward."""
    load_policy: object = None
    """A ``megatron.model.LoadPolicy`` for --load (None: the checkpoint must match exactly)."""
    check_args: object = None
    """(args) -> None: the family's own flag checks (a UserError naming the flag)."""
    prepare: object = None
    """(args, tokenizer, log) -> None, after the tokenizer and before the model: e.g. a
    finetuning task reads its data and sets --train-iters from --epochs."""
    after_iteration: object = None
    """(args, state, step, log) -> bool, after each training iteration (logged, evaluated):
    e.g. the end-of-epoch accuracy of a finetuning task; True asks for a checkpoint now."""
    after_training: object = None
    """(args, state, step, log) -> None, once training ends (also with nothing to train, e.g.
    evaluation only), unless an --exit-* condition ended the program."""
    rows_per_sample: int = 1
    """Sequences per sample between pipeline stages (a 4-choice sample: 4)."""


@dataclasses.dataclass
class PretrainResult:
    """What a run leaves behind besides checkpoints and logs (used by tests and studies)."""

    state: TrainState
    model: torch.nn.Module
    train_losses: Sequence  # [(iteration, {name: float})], one entry per iteration (LossHistory)
    valid_losses: Sequence  # [(iteration, {name: float})], one entry per evaluation
    test_losses: Sequence = ()  # the end-of-training test-set evaluation, if any


def pretrain(provider, model_provider=None, forward_step_provider=None, *, argv=None,
             extra_args_provider=None, args_defaults=None, log=print_rank_0):
    """Parse Megatron's flags from ``argv`` and train with ``provider`` (a ``Provider``, or
    Megatron's three functions: datasets, model, forward-step providers). Returns a
    ``PretrainResult``."""
    if not isinstance(provider, Provider):
        provider = Provider(model=model_provider, datasets=provider,
                            forward_step=forward_step_provider)
    args = parse_args(argv, extra_args_provider, defaults=args_defaults)
    if provider.check_args is not None:
        provider.check_args(args)
    return run_pretraining(args, provider, log=log)


def build_tokenizer_from_args(args, log=print_rank_0):
    """Build the tokenizer named by the flags and record the padded vocabulary size on args."""
    from megatron.tokenizer import build_tokenizer, vocab_size_with_padding

    if args.tokenizer_type is None:
        raise UserError("--tokenizer-type is required")
    tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file,
                                merge_file=args.merge_file, tokenizer_model=args.tokenizer_model,
                                vocab_size=args.vocab_size, vocab_extra_ids=args.vocab_extra_ids)
    args.padded_vocab_size = vocab_size_with_padding(tokenizer.vocab_size,
                                                     args.make_vocab_size_divisible_by,
                                                     args.tensor_model_parallel_size)
    log(f" > padded vocab (size: {tokenizer.vocab_size}) with "
        f"{args.padded_vocab_size - tokenizer.vocab_size} dummy tokens "
        f"(new size: {args.padded_vocab_size})")
    return tokenizer


def run_pretraining(args, provider, log=print_rank_0):
    """Set up, train, evaluate; ``provider`` is a ``Provider``.

    With --exit-signal-handler the whole run (setup included) records SIGTERM / --exit-signal /
    SIGINT, which the loop honours at the next iteration's end. A collective or point-to-point
    wait that outlives --distributed-timeout-minutes, or a peer that died, ends this rank with
    one line (a UserError) instead of a hang or a gloo traceback; under NCCL, whose watchdog
    finds the timeout on its own thread, a ``BackendFailureWatch`` prints that line and exits
    before torch's C++ abort. The line names the rank that stopped, with its host: the
    ``Heartbeat`` each rank keeps in the rendezvous store tells which one went silent."""
    start_time = time.time()
    handler = DistributedSignalHandler(exit_signals(args) or ())
    env = read_distributed_env()
    started_here = env.world_size > 1 and not torch.distributed.is_initialized()
    timeout = args.distributed_timeout_minutes
    beat = Heartbeat(env.master_addr, env.master_port, env.rank, env.world_size)
    try:
        if started_here:
            init_process_group(env, args.distributed_backend
                               or default_distributed_backend(args.device),
                               timeout_minutes=timeout)
        elif args.deepspeed:  # the engine needs a process group, even for one process
            from megatron.ds.engine import start_single_process_group

            start_single_process_group()
        if torch.distributed.is_initialized():
            beat.start()
        with handler, BackendFailureWatch(timeout, env.rank, env.world_size,
                                          heartbeat=beat) as watch:
            return _run_pretraining(args, provider, log, start_time, handler, watch)
    except RuntimeError as err:
        failure = communication_failure(err, timeout, env.rank, env.world_size, beat)
        if failure is None:
            raise
        beat.stopping()
        beat.exit_quietly(USER_ERROR_STATUS)
        raise UserError(failure) from None
    finally:
        beat.close()
        if started_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_pretraining(args, provider, log, start_time, signal_handler=None, failure_watch=None):
    device = select_device(args.device)
    args.device = str(device)
    parallel = build_parallel_state(args.tensor_model_parallel_size,
                                    args.pipeline_model_parallel_size,
                                    timeout_minutes=args.distributed_timeout_minutes)
    if failure_watch is not None and torch.distributed.is_initialized():
        failure_watch.add([torch.distributed.group.WORLD, *parallel.process_groups(),
                           *known_process_groups()])
    # As Megatron (_set_random_seed): every pipeline stage gets its own seed, seed + 100 * pp,
    # for the default generator and the tracker (different dropout streams per stage);
    # tensor-parallel ranks share the default one, so replicated regions drop the same units.
    stage_seed = args.seed + 100 * parallel.pp_rank
    parallel = dataclasses.replace(parallel,
                                   rng_tracker=build_rng_tracker(stage_seed, parallel.tp_rank))
    set_random_seed(stage_seed)
    tokenizer = build_tokenizer_from_args(args, log)
    if provider.prepare is not None:
        provider.prepare(args, tokenizer, log)
    if args.save is not None:
        check_save_dir(args.save)

    model = build_model_chunks(provider.model, args, parallel).to(device)
    initialize_embedding_tie(model, parallel)
    n_params = sum(p.numel() for p in model.parameters())
    log(f" > number of parameters on (tensor, pipeline) model parallel rank "
        f"({parallel.tp_rank}, {parallel.pp_rank}): {n_params}")
    if args.deepspeed:  # DeepSpeed's engine: ZeRO, its loss scaling and clipping
        from megatron.ds.engine import build_engine

        optimizer = build_engine(args, model, parallel, log)
    else:
        optimizer = build_optimizer(model, args=args, log=log,
                                    model_parallel_group=parallel.mp_group,
                                    tp_rank=parallel.tp_rank, data_parallel_group=parallel.dp_group)
    from megatron.model.transformer import is_encoder_model

    ltd = build_token_dropping(args, log, encoder=is_encoder_model(model))
    if ltd.method == "sctd" and isinstance(model, torch.nn.ModuleList):
        raise UserError("--random-ltd-method sctd with --num-layers-per-virtual-pipeline-stage: "
                        "not supported (SCTD's full + dropped pass travels as one doubled batch "
                        "through the plain 1F1B schedule only); drop one of the two")
    if ltd.method == "sctd" and not getattr(model, "supports_sctd", False):
        raise UserError("--random-ltd-method sctd is a BERT method (a KL between [CLS] hidden "
                        "states): use pretrain_bert.py")
    resolve_train_iters(args, ltd)
    scheduler = build_scheduler(args, optimizer, ltd)
    if args.deepspeed:
        from megatron.ds.engine import load_engine_checkpoint

        state, ckpt = load_engine_checkpoint(args, optimizer.engine, scheduler, parallel, log)
    else:
        state, ckpt = load_checkpoint(args, model, optimizer, scheduler, parallel.rng_tracker,
                                      log=log, parallel=parallel, policy=provider.load_policy)
    if ckpt is not None and state.iteration > 0 and "random_ltd_scheduler" in ckpt:
        ltd.load_state_dict(ckpt["random_ltd_scheduler"])
    pretrained = getattr(args, "pretrained_checkpoint", None)
    if pretrained is not None and state.iteration == 0:
        # tasks/ (Megatron's --pretrained-checkpoint): weights only, from any TP/PP layout,
        # when the run does not resume from its own --load checkpoint
        from megatron.checkpointing import ReadOptions, load_pretrained_weights

        load_pretrained_weights(pretrained, model, parallel, policy=provider.load_policy,
                                log=log, reading=ReadOptions.from_args(args))
    if (args.load is not None and (args.no_load_optim or args.finetune)) \
            or (pretrained is not None and state.iteration == 0):
        optimizer.reload_model_params()

    train_iter, valid_iter, test_iter = build_data_iterators(
        args, state, tokenizer, provider.datasets, parallel, log,
        worker_init_fn=signal_handler.worker_init_fn if signal_handler is not None else None)
    if args.deepspeed:
        from megatron.ds.engine import step_runner_class

        step = step_runner_class()(args, parallel, model, optimizer.engine, optimizer,
                                   provider.forward_step(args, tokenizer),
                                   rows_per_sample=provider.rows_per_sample)
    else:
        step = StepRunner(args, parallel, model,
                          wrap_data_parallel(model, parallel, main_grads=uses_main_grads(args)),
                          optimizer, provider.forward_step(args, tokenizer),
                          rows_per_sample=provider.rows_per_sample)
    if failure_watch is not None:  # and the groups set-up made (DeepSpeed's engine's own)
        failure_watch.add(known_process_groups())
    # As Megatron: the last rank (the last pipeline stage, which computes the loss) writes
    # TensorBoard.
    logger = TrainingLogger(args, log=log, write=torch_rank() == torch_world_size() - 1)
    log(f"setup done in {time.time() - start_time:.1f} s; training on {device} "
        f"(TP {parallel.tp_size} x PP {parallel.pp_size} x DP {parallel.dp_size})")

    try:
        exited = False
        if not args.skip_train and state.iteration < args.train_iters:
            exited = train(args, state, step, scheduler, ltd, train_iter, valid_iter, logger,
                           start_time, log, flops_per_sample=provider.flops_per_sample,
                           after_iteration=provider.after_iteration,
                           signal_handler=signal_handler)
        if not exited and provider.after_training is not None:
            provider.after_training(args, state, step, log)
        # As Megatron: --exit-interval / --exit-duration-in-mins end the program after the
        # checkpoint, without the end-of-training evaluations (a job about to hit its time limit
        # must not start a full validation and test pass).
        if not exited and args.eval_iters > 0 and valid_iter is not None:
            run_evaluation(args, state, step, valid_iter, logger,
                           "the end of training for val data", ltd)  # Megatron's prefixes
        if not exited and args.eval_iters > 0 and test_iter is not None:
            run_evaluation(args, state, step, test_iter, logger,
                           "the end of training for test data", ltd, test=True)
    finally:
        logger.close()
        if signal_handler is not None and signal_handler.signals:
            end_data_workers((train_iter, valid_iter, test_iter))  # they ignore SIGTERM
    return PretrainResult(state, model, logger.train_history, logger.valid_history,
                          logger.test_history)


def build_token_dropping(args, log=print_rank_0, encoder=False):
    """The run's random-LTD driver (also counts layer tokens when random-LTD is off).
    ``encoder``: the model is bidirectional (BERT): TokenBypass's encoder variant."""
    from megatron.ltd.config import random_ltd_config_from_args
    from megatron.ltd.driver import TokenDroppingDriver

    cfg = random_ltd_config_from_args(args)
    driver = TokenDroppingDriver(cfg, num_layers=args.num_layers, seq_length=args.seq_length,
                                 global_batch_size=args.global_batch_size, seed=args.seed,
                                 encoder=encoder)
    if driver.enabled:
        log(f" > random-LTD ({cfg.method}): layers {list(driver.cfg.layer_ids)} drop tokens, kept "
            f"length {cfg.start} -> {cfg.seq_length} ({cfg.schedule}, step {cfg.step}, over "
            f"{cfg.schedule_steps or cfg.schedule_tokens} "
            f"{'iterations' if cfg.schedule_steps else 'tokens'})")
    if cfg is not None and cfg.layer_token_lr:
        log(" > LayerToken LR: warmup and decay measured in consumed layer tokens")
    return driver


def build_scheduler(args, optimizer, ltd=None):
    """Megatron's LR/WD scheduler; with --layer-token-lr its token axis is layer tokens.

    A --train-tokens budget alone keeps its token-based schedule (the iteration count derived
    from it is only the loop's bound); a --train-layer-tokens budget gives an exact iteration
    count, so iteration-based flags apply to it."""
    if getattr(args, "train_iters_from_tokens", False):
        args = argparse.Namespace(**{**vars(args), "train_iters": None})
    steps = scheduler_steps_from_args(args)
    warmup_tokens, decay_tokens = steps.lr_warmup_tokens, steps.lr_decay_tokens
    warmup_steps, decay_steps = steps.lr_warmup_steps, steps.lr_decay_steps
    if ltd is not None and ltd.cfg is not None and ltd.cfg.layer_token_lr:
        from megatron.ltd.layer_tokens import layer_token_lr_horizons_from_args

        warmup_tokens, decay_tokens = layer_token_lr_horizons_from_args(args, ltd.cfg,
                                                                        ltd.scheduler)
        warmup_steps = 0
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style, start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay, wd_incr_steps=steps.wd_incr_steps,
        wd_incr_style=args.weight_decay_incr_style,
        lr_warmup_tokens=warmup_tokens, lr_decay_tokens=decay_tokens,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler)


def resolve_train_iters(args, ltd=None):
    """Megatron's iteration bound: --train-iters, or from --train-samples, or enough
    iterations for a --train-tokens / --train-layer-tokens budget (the budget stops the loop)."""
    if args.train_iters is not None:
        return args.train_iters
    if args.train_samples is not None:
        args.train_iters = train_iters_for_samples(args, args.train_samples)  # ramp-up aware
        return args.train_iters
    args.train_iters_from_tokens = args.train_layer_tokens is None
    if ltd is not None:
        args.train_iters = ltd.iteration_bound(args.train_tokens)
    else:
        args.train_iters = math.ceil(args.train_tokens
                                     / (args.global_batch_size * args.seq_length))
    return args.train_iters


def train_valid_test_num_samples(args):
    """Megatron's dataset target sizes (in samples) for train, valid and test."""
    if args.train_samples is not None:
        train_samples = args.train_samples
    else:
        train_samples = args.train_iters * args.global_batch_size
    eval_iters = (args.train_iters // args.eval_interval + 1) * args.eval_iters
    return (train_samples, eval_iters * args.global_batch_size,
            args.eval_iters * args.global_batch_size)


def build_data_iterators(args, state, tokenizer, datasets_provider, parallel, log,
                         worker_init_fn=None):
    """Train/valid/test iterators, as Megatron: 'single' iterates the loader once; 'cyclic'
    wraps it in ``cyclic_iter``, so each pass of the random sampler ends an epoch and the next
    one starts (a new order) instead of raising StopIteration. The validation iterator is
    built once and continues from ``consumed_valid_samples`` across evaluations.
    ``worker_init_fn``: run in each data loader worker (--exit-signal-handler's)."""
    from megatron.data.samplers import (build_pretraining_data_loader, checked_token_ids,
                                        cyclic_iter)

    # As Megatron (build_train_valid_test_data_loaders): a checkpoint from before the consumed
    # sample counters were saved resumes after the samples its iterations consumed, not at 0.
    if state.iteration > 0 and args.train_samples is None:
        if state.consumed_train_samples == 0:
            state.consumed_train_samples = state.iteration * args.global_batch_size
        if state.consumed_valid_samples == 0 and args.eval_interval:
            state.consumed_valid_samples = (state.iteration // args.eval_interval) \
                * args.eval_iters * args.global_batch_size
    num_samples = train_valid_test_num_samples(args)
    log(" > datasets target sizes (minimum size):")
    log(f"    train:      {num_samples[0]}")
    log(f"    validation: {num_samples[1]}")
    log(f"    test:       {num_samples[2]}")
    train_ds, valid_ds, test_ds = datasets_provider(args, tokenizer, num_samples)
    if train_ds is None and not args.skip_train and state.iteration < args.train_iters:
        raise UserError(_no_training_data(args))

    def loader(dataset, consumed):
        if dataset is None:
            return None
        data_loader = build_pretraining_data_loader(
            dataset, consumed, args.micro_batch_size, dp_rank=parallel.dp_rank,
            dp_size=parallel.dp_size, num_workers=args.num_workers,
            dataloader_type=args.dataloader_type, seed=args.seed,
            worker_init_fn=worker_init_fn)
        if args.dataloader_type == "cyclic":
            data_loader = cyclic_iter(data_loader)
        return checked_token_ids(iter(data_loader), dataset, args.padded_vocab_size)

    return (loader(train_ds, state.consumed_train_samples),
            loader(valid_ds, state.consumed_valid_samples),
            loader(test_ds, 0))


def _no_training_data(args):
    """Why there is no training dataset, naming the flag to change."""
    if args.data_path:
        return (f"--split {args.split}: the training split of --data-path gets no documents; "
                f"give it a share (e.g. --split 949,50,1), or --skip-train to only evaluate")
    if args.valid_data_path or args.test_data_path:
        return ("--train-data-path: required to train (only --valid-data-path/--test-data-path "
                "were given), or --skip-train to only evaluate")
    return "no training data: give --data-path (or --train-data-path), or --skip-train"


def flops_per_iteration(args, kept_lengths=None, flops_per_sample=transformer_flops_per_sample,
                        batch_size=None):
    """Model FLOPs of one iteration: the global batch (``batch_size`` under
    --rampup-batch-size) times ``flops_per_sample``."""
    return (batch_size or args.global_batch_size) * flops_per_sample(args, kept_lengths)


def uses_main_grads(args) -> bool:
    """Gradients accumulate and all-reduce in fp32 ``main_grad`` buffers: bf16 (Megatron forces
    --accumulate-allreduce-grads-in-fp32 for it, also where ``args`` lacks the flag), or fp16
    with the flag; never for fp32 parameters."""
    dtype = params_torch_dtype(args)  # a torch dtype, as Megatron saves it, or our older names
    if dtype == torch.bfloat16:
        return True
    return dtype == torch.float16 and bool(getattr(args, "accumulate_allreduce_grads_in_fp32",
                                                   False))


@dataclasses.dataclass
class StepRunner:
    """One rank's model, optimizer and schedule: runs training steps and evaluation batches.

    ``model`` is this rank's module (a pipeline stage, tensor-parallel shard); ``wrapped`` the
    same module under data parallelism (or itself). Loss dicts come back on every rank: reduced
    on the last pipeline stage (mean over micro-batches and data-parallel replicas) and
    broadcast along the pipeline.
    """

    args: argparse.Namespace
    parallel: ParallelState
    model: torch.nn.Module
    wrapped: torch.nn.Module
    optimizer: object
    forward_step: object
    num_zeros: object = None
    """Zero entries in the last step's gradients (--log-num-zeros-in-grad), else None."""
    reducer: object = None
    """The ``OverlappedGradReducer`` averaging the gradients over the DP group during the
    step's last backward, where no DDP wrapper does (main grads, pipeline stages, model
    chunks); None otherwise."""

    def __post_init__(self):
        # fp32 main_grad buffers (``uses_main_grads``): attached here too for callers that
        # build the runner themselves (idempotent); they replace the DDP wrapper, and the
        # reducer averages them over the DP group during the step's last backward.
        self.main_grads = uses_main_grads(self.args)
        if self.main_grads:
            if is_data_parallel(self.wrapped):
                raise ValueError("fp32 main_grad accumulation replaces the DDP wrapper; build "
                                 "it with wrap_data_parallel(..., main_grads=True)")
            attach_main_grads(self.model)
        if self.reducer is None and not is_data_parallel(self.wrapped) \
                and self.parallel.dp_size > 1 and self.parallel.dp_group is not None:
            self.reducer = OverlappedGradReducer(self.model, self.parallel.dp_group)

    rows_per_sample: int = 1
    """Sequences per sample in the activations between pipeline stages (a multiple-choice
    sample of 4 choices travels as 4 rows)."""
    loss_backward = None
    """The schedule's backward of a loss (None: ``optimizer.scale_loss(loss).backward()``;
    DeepSpeed's runner: the engine's)."""

    def _run_schedule(self, data_iterator, token_drop, forward_only, micro_batch_size=None,
                      num_microbatches=None, forward_step=None):
        """forward_backward over this step's micro-batches -> the last stage's report dicts."""
        args = self.args
        seq = args.seq_length // (args.tensor_model_parallel_size if args.sequence_parallel
                                  else 1)
        # SCTD's dual step sends both passes between pipeline stages as one doubled batch.
        batch = (micro_batch_size or args.micro_batch_size) * self.rows_per_sample \
            * getattr(token_drop, "batch_multiplier", 1)
        return forward_backward(
            forward_step=forward_step or self.forward_step, data_iterator=data_iterator,
            model=self.wrapped, parallel=self.parallel,
            num_microbatches=num_microbatches or args.num_micro_batches,
            tensor_shape=(batch, seq, args.hidden_size),
            dtype=params_torch_dtype(args),
            scale_loss=None if forward_only else self.optimizer.scale_loss,
            token_drop=token_drop, forward_only=forward_only,
            no_sync=None if forward_only else (self.reducer.no_sync if self.reducer is not None
                                               else no_sync_factory(self.wrapped)),
            backward=None if forward_only else self.loss_backward)

    def _schedule(self, data_iterator, token_drop, forward_only, num_microbatches=None):
        return reduce_loss_dicts(self._run_schedule(data_iterator, token_drop, forward_only,
                                                    num_microbatches=num_microbatches),
                                 self.parallel)

    def train_step(self, data_iterator, token_drop=None, batch_size=None):
        """One optimizer step over the global batch (``batch_size`` samples: this step's under
        --rampup-batch-size; default --global-batch-size); (losses, update_successful,
        grad_norm)."""
        self.optimizer.zero_grad()
        if self.main_grads:
            zero_main_grads(self.model)
        self.model.train()
        micro_batches = None if batch_size is None else \
            batch_size // (self.args.micro_batch_size * self.parallel.dp_size)
        losses = self._schedule(data_iterator, token_drop, forward_only=False,
                                num_microbatches=micro_batches)
        if self.reducer is not None:
            self.reducer.finish()
        allreduce_embedding_grads(self.model, self.parallel)
        if self.args.sequence_parallel:
            allreduce_sequence_parallel_grads(self.model, self.parallel)
        update_successful, grad_norm, self.num_zeros = self.optimizer.step()
        return losses, update_successful, grad_norm

    def save_checkpoint(self, state, scheduler, log, extra_state):
        """Save the run's checkpoint (every rank calls this)."""
        save_checkpoint(self.args, state, self.model, self.optimizer, scheduler,
                        self.parallel.rng_tracker, log=log, parallel=self.parallel,
                        extra_state=extra_state)

    @torch.no_grad()
    def params_norm(self):
        """L2 norm of all parameters, each counted once (Megatron's calc_params_l2_norm):
        tensor-parallel shards on every rank, replicated ones on TP rank 0, shared copies never;
        summed over the model-parallel group."""
        from megatron.optim.clip_grads import (param_is_not_shared,
                                               param_is_not_tensor_parallel_duplicate)

        total = torch.zeros((), dtype=torch.float32, device=comm_device())
        for p in self.model.parameters():  # one at a time: no fp32 copy of the whole model
            if param_is_not_shared(p) and \
                    param_is_not_tensor_parallel_duplicate(p, self.parallel.tp_rank):
                norm = torch.linalg.vector_norm(p.detach(), dtype=torch.float32)
                total += norm.to(total.device) ** 2
        if self.parallel.mp_group is not None and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total, group=self.parallel.mp_group)
        return float(total.sqrt())

    @torch.no_grad()
    def evaluate(self, data_iterator, eval_iters):
        """Mean of each reported loss over ``eval_iters`` global batches (no dropout/dropping)."""
        self.model.eval()
        totals = {}
        for _ in range(eval_iters):
            for key, value in self._schedule(data_iterator, None, forward_only=True).items():
                totals[key] = totals.get(key, 0.0) + value
        self.model.train()
        return {key: value / eval_iters for key, value in totals.items()}

    @torch.no_grad()
    def evaluate_dataset(self, loader, forward_step=None):
        """One pass over a whole evaluation set -> {name: (numerator, denominator)} summed over
        every micro-batch and data-parallel rank (the same on every rank).

        ``loader``: a ``megatron.data.samplers.EvalDataLoader`` (every sample exactly once over
        the DP ranks, padding samples marked ``eval_valid`` 0 for the forward step to leave out);
        ``forward_step``: this evaluation's, if not the training one; its ``loss_func`` reports
        ratios ``(correct, total)`` or sums ``(loss sum, tokens)``. No dropout, no dropping."""
        if loader.num_micro_batches == 0:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            reported = self._run_schedule(iter(loader), None, True,
                                          micro_batch_size=loader.micro_batch_size,
                                          num_microbatches=loader.num_micro_batches,
                                          forward_step=forward_step)
        finally:
            self.model.train(was_training)
        return sum_metric_pairs(reported, self.parallel)


def torch_rank():
    dist = torch.distributed
    return dist.get_rank() if dist.is_initialized() else 0


def torch_world_size():
    dist = torch.distributed
    return dist.get_world_size() if dist.is_initialized() else 1


def is_ratio(value) -> bool:
    """A reported value given as ``(numerator, denominator)`` (e.g. correct / total)."""
    return isinstance(value, (tuple, list)) and len(value) == 2


def _broadcast_along_pipeline(obj, parallel):
    if parallel.pp_size > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=parallel.pp_ranks[-1],
                                                group=parallel.pp_group)
        obj = box[0]
    return obj


def _sum_pairs(reported, parallel):
    sums = {}
    for item in reported:
        for key, value in item.items():
            num, den = (value if is_ratio(value) else (value, 1))
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += float(num)
            acc[1] += float(den)
    if parallel.dp_size > 1 and parallel.is_last_stage:
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                         device=comm_device()).view(-1, 2)
        torch.distributed.all_reduce(t, group=parallel.dp_group)
        sums = {k: [float(v[0]), float(v[1])] for k, v in zip(keys, t)}
    return {k: tuple(v) for k, v in sums.items()}


def sum_metric_pairs(reported, parallel):
    """Per-micro-batch report dicts (last stage only) -> {name: (numerator, denominator)}
    summed over micro-batches and data-parallel replicas, the same on every rank. A ratio
    ``(n, d)`` adds both parts; a plain value ``v`` counts as ``(v, 1)``, so its ratio is the
    mean over micro-batches."""
    return _broadcast_along_pipeline(_sum_pairs(reported, parallel), parallel)


def reduce_loss_dicts(reported, parallel):
    """Per-micro-batch loss dicts (last stage only) -> {name: float}, the same on every rank:
    plain values averaged over micro-batches and data-parallel replicas; a ratio
    ``(numerator, denominator)`` (a token-weighted loss, correct / total) is the sum of its
    numerators over the sum of its denominators (no mean of means); broadcast along the
    pipeline."""
    losses, ratios = {}, []
    for item in reported:
        ratios.append({k: v for k, v in item.items() if is_ratio(v)})
        for key, value in item.items():
            if not is_ratio(value):
                losses[key] = losses.get(key, 0.0) + float(value) / len(reported)
    if parallel.dp_size > 1 and parallel.is_last_stage:
        keys = sorted(losses)
        t = torch.tensor([losses[k] for k in keys], dtype=torch.float64, device=comm_device())
        torch.distributed.all_reduce(t, group=parallel.dp_group)
        losses = {k: float(v) / parallel.dp_size for k, v in zip(keys, t)}
    if any(ratios):  # the same names on every data-parallel rank of the last stage
        sums = _sum_pairs(ratios, parallel)
        losses.update({k: n / d if d else float("nan") for k, (n, d) in sums.items()})
    return _broadcast_along_pipeline(losses, parallel)


def agree_on_exit(stop, signum, parallel):
    """(stop, signal) agreed by every rank in one tiny all-reduce (MAX) over the world:
    ``stop`` is true where any rank wants to stop (a wall-clock limit may trip on one rank
    first); ``signal`` the largest signal number any rank's --exit-signal-handler recorded
    (None: none), so every rank saves and exits at the same iteration."""
    if parallel.world_size == 1:
        return stop, signum
    flags = torch.tensor([int(stop), int(signum or 0)], dtype=torch.int32, device=comm_device())
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    stop, signum = (int(v) for v in flags.tolist())
    return bool(stop), signum or None


def run_evaluation(args, state, step, data_iterator, logger, prefix, ltd=None,
                   count_valid=None, test=False):
    """Evaluate ``eval_iters`` global batches and log them (``test``: the test set, logged as
    Megatron's ``lm loss test``, not counted in consumed_valid_samples)."""
    if count_valid is None:
        count_valid = not test
    try:
        losses = step.evaluate(data_iterator, args.eval_iters)
    except StopIteration:
        logger.log(f" > evaluation skipped at {prefix}: the dataset is exhausted")
        return None
    if count_valid:
        state.consumed_valid_samples += args.eval_iters * args.global_batch_size
    logger.validation(prefix, losses, state.iteration, state.consumed_train_samples,
                      state.consumed_train_tokens,
                      ltd.consumed_layer_tokens if ltd is not None else None, test=test)
    return losses


def _budget_spent(args, state, ltd):
    """The --train-tokens / --train-layer-tokens stop: a reason, or "" while training goes on.
    Checked before every iteration (Megatron-DeepSpeed's loop condition), so a run resumed
    from a checkpoint that already spent its budget trains no further."""
    if args.train_tokens is not None and state.consumed_train_tokens >= args.train_tokens:
        return f"consumed {state.consumed_train_tokens} tokens (--train-tokens)"
    if ltd.budget_reached():
        return f"consumed {ltd.consumed_layer_tokens} layer tokens (--train-layer-tokens)"
    return ""


def _should_exit(args, state, start_time):
    """(exit, reason) for --exit-interval and --exit-duration-in-mins (Megatron's exits: save,
    then end the program without the end-of-training evaluations)."""
    if args.exit_interval and state.iteration % args.exit_interval == 0:
        return True, f"iteration {state.iteration} is a multiple of --exit-interval"
    if args.exit_duration_in_mins is not None:
        minutes = (time.time() - start_time) / 60.0
        if minutes > args.exit_duration_in_mins:
            return True, f"ran {minutes:.1f} minutes (--exit-duration-in-mins)"
    return False, ""


def check_step_is_finite(args, iteration, losses, update_successful, grad_norm, skipped_in_row):
    """--check-for-nan-in-loss-and-grad and --max-consecutive-skipped after a training step.

    A non-finite loss (already reduced, the same on every rank) or gradient norm (reduced over
    the model-parallel group; None where --clip-grad 0 computes none) stops the run with one
    line, before anything can save that state. A step the fp16 loss scaler skipped is not an
    error (its overflow is what the scaler is for), but --max-consecutive-skipped of them in a
    row is: the scaler has stopped finding a scale that works. Returns the new count of skips
    in a row."""
    if not update_successful:
        skipped_in_row += 1
        limit = args.max_consecutive_skipped
        if limit and limit > 0 and skipped_in_row >= limit:
            raise UserError(f"iteration {iteration}: the fp16 loss scaler skipped {skipped_in_row} "
                            f"steps in a row (--max-consecutive-skipped {limit}): the gradients "
                            f"overflow at every scale; lower --lr or train in bf16")
        return skipped_in_row
    if args.check_for_nan_in_loss_and_grad:
        bad = [f"{name} {value}" for name, value in losses.items() if not math.isfinite(value)]
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad.append(f"grad norm {grad_norm}")
        if bad:
            raise UserError(f"iteration {iteration}: not finite: {', '.join(bad)}; stopped "
                            f"without saving this state (--check-for-nan-in-loss-and-grad; the "
                            f"last checkpoint is the resume point; try a lower --lr)")
    return 0


def check_params_are_finite(model, parallel, iteration):
    """Refuse to save non-finite parameters (--check-for-nan-in-loss-and-grad): a NaN
    checkpoint made ``latest`` would replace the user's last good resume point. One pass over
    the parameters and one all-reduce, once per save."""
    params = [p.detach() for p in model.parameters()]
    bad = int(not all(bool(torch.isfinite(p).all()) for p in params))
    if parallel.world_size > 1:
        bad = agree_on_exit(bad, None, parallel)[0]
    if bad:
        raise UserError(f"iteration {iteration}: the model's parameters are not finite; not "
                        f"saving this state (--check-for-nan-in-loss-and-grad; the last "
                        f"checkpoint is the resume point)")


def train(args, state, step, scheduler, ltd, train_iter, valid_iter, logger, start_time, log,
          flops_per_sample=transformer_flops_per_sample, after_iteration=None,
          signal_handler=None):
    """Run iterations until --train-iters or another stop condition; save as requested.
    ``after_iteration``: the provider's hook (``Provider.after_iteration``);
    ``signal_handler``: a ``DistributedSignalHandler`` (--exit-signal-handler) whose signal,
    on any rank, ends training after a checkpoint at the current iteration's end.

    Returns True when --exit-interval, --exit-duration-in-mins or an exit signal ended
    training (the caller then skips the end-of-training evaluations, as Megatron's
    ``sys.exit()`` does)."""
    layer_token_lr = ltd.cfg is not None and ltd.cfg.layer_token_lr

    optimizer = step.optimizer

    def save():
        if args.save is not None:
            if args.check_for_nan_in_loss_and_grad:
                check_params_are_finite(step.model, step.parallel, state.iteration)
            step.save_checkpoint(state, scheduler, log,
                                 extra_state={"random_ltd_scheduler": ltd.state_dict()})

    saved_at = None
    first_iteration = state.iteration
    exited = False
    skipped_in_row = 0
    while state.iteration < args.train_iters:
        spent = _budget_spent(args, state, ltd)
        if spent:
            log(f"training budget reached at iteration {state.iteration}: {spent}")
            break
        token_drop = ltd.begin_iteration(state.iteration)
        dual = ltd.full_pass  # SCTD: the full-sequence pass runs too
        kept = ltd.reserved_length
        per_layer = ltd.tokens_per_layer() if ltd.enabled else None
        batch = current_global_batch_size(args, state.consumed_train_samples)  # ramp-up
        losses, ok, grad_norm = step.train_step(train_iter, token_drop, batch_size=batch)
        skipped_in_row = check_step_is_finite(args, state.iteration + 1, losses, ok, grad_norm,
                                              skipped_in_row)
        # As Megatron-DeepSpeed: "consumed tokens" grow by the layer-averaged sequence length
        # (the full length when nothing is dropped), and the token-based LR sees the count
        # from before this step.
        tokens_before = state.consumed_train_tokens
        state.consumed_train_tokens += batch * ltd.effective_seq_length()
        ltd.end_iteration(step.parallel, batch_size=batch)
        if ok:
            scheduler.step(increment=batch,
                           token_num=ltd.consumed_layer_tokens if layer_token_lr
                           else tokens_before)
        state.iteration += 1
        state.consumed_train_samples += batch
        if not ok:
            state.skipped_iters += 1
        if any(math.isnan(v) or math.isinf(v) for v in losses.values()):
            state.nan_iters += 1  # skipped or not (the logger's count)
        extra = {}
        if ltd.enabled:  # Megatron-DeepSpeed's names
            extra["seqlen/random_ltd_reserved_length"] = ("random ltd reserved length", kept)
            # TensorBoard only: what each layer processed (per sample) under this method
            for layer, n in per_layer.items():
                extra[f"random-ltd/kept-tokens/layer-{layer:02d}"] = (None, n)
            if ltd.method == "sctd":
                extra["random-ltd/sctd-full-pass"] = (None, int(dual))
        extra["seqlen/actual_seq_length"] = ("actual seqlen", ltd.effective_seq_length())
        extra["layer-tokens/consumed-layer-tokens"] = ("consumed layer tokens",
                                                       ltd.consumed_layer_tokens)
        if args.log_num_zeros_in_grad and step.num_zeros is not None:
            extra["num-zeros/num-zeros"] = ("num zeros", float(step.num_zeros))
        if args.log_params_norm:
            extra["params-norm/params-norm"] = ("params norm", step.params_norm())
        if args.log_optimizer_states_to_tensorboard and args.tensorboard_dir \
                and state.iteration % args.tensorboard_log_interval == 0:
            from megatron.optim.state_stats import optimizer_state_stats

            for tag, value in optimizer_state_stats(optimizer, step.parallel).items():
                extra[tag] = (None, value)  # TensorBoard only (Megatron-DeepSpeed's tags)
        if args.log_world_size_to_tensorboard \
                and state.iteration % args.tensorboard_log_interval == 0:
            logger.scalar("world-size/world-size", args.world_size, state.iteration,
                          state.consumed_train_samples, state.consumed_train_tokens,
                          ltd.consumed_layer_tokens)
        flops = flops_per_iteration(args, ltd.kept_lengths if ltd.enabled else None,
                                    flops_per_sample, batch_size=batch)
        if dual:
            flops += flops_per_iteration(args, None, flops_per_sample, batch_size=batch)
        logger.training_step(state, losses, optimizer.param_groups[0]["lr"], grad_norm,
                             float(optimizer.get_loss_scale()), skipped=not ok, extra=extra,
                             flops=flops, layer_tokens=ltd.consumed_layer_tokens,
                             batch_size=batch)

        if args.eval_interval and state.iteration % args.eval_interval == 0 \
                and args.eval_iters > 0 and valid_iter is not None:
            run_evaluation(args, state, step, valid_iter, logger, f"iteration {state.iteration}",
                           ltd)
        wants_save = after_iteration is not None and after_iteration(args, state, step, log)
        if wants_save or (args.save_interval and state.iteration % args.save_interval == 0):
            save()
            saved_at = state.iteration
        stop, reason = _should_exit(args, state, start_time)
        received = signal_handler.received if signal_handler is not None else None
        stop, signum = agree_on_exit(stop, received, step.parallel)
        if signum is not None:
            name = signal.Signals(signum).name
            stop, reason = True, f"received {name} (--exit-signal-handler); saving a checkpoint"
        if stop:
            log(f"exiting at iteration {state.iteration}: {reason}")
            exited = True
            break
    if state.iteration != first_iteration and saved_at != state.iteration:
        save()
    return exited
