"""The pretraining loop: setup, train_step, evaluate, exit conditions, checkpoints.

Entry points (``pretrain_gpt.py``, ``pretrain_bert.py``) supply three providers and call
``pretrain``:

- ``model_provider(args, parallel) -> torch.nn.Module``
- ``datasets_provider(args, tokenizer, num_samples) -> (train, valid, test)`` where
  ``num_samples`` is the (train, valid, test) target size in samples;
- ``forward_step_provider(args, tokenizer) -> forward_step`` with Megatron's narrow contract
  ``forward_step(data_iterator, model, token_drop=None) -> (output_tensor, loss_func)`` and
  ``loss_func(output_tensor) -> (loss, {name: value})``. ``token_drop`` is None (evaluation,
  or random-LTD off) or a callable mapping the micro-batch's sample ids (the ``'index'`` field
  of the batch) to a ``megatron.ltd.TokenDropState``.
"""

import dataclasses
import math
import time

import torch

from megatron.arguments import parse_args
from megatron.checkpointing import TrainState, load_checkpoint, save_checkpoint
from megatron.errors import UserError
from megatron.initialize import select_device, set_random_seed
from megatron.optim import OptimizerParamScheduler, build_optimizer, scheduler_steps_from_args
from megatron.parallel.random import build_rng_tracker
from megatron.parallel.state import ParallelState
from megatron.training_log import TrainingLogger
from megatron.utils import print_rank_0


@dataclasses.dataclass
class PretrainResult:
    """What a run leaves behind besides checkpoints and logs (used by tests and studies)."""

    state: TrainState
    model: torch.nn.Module
    train_losses: list  # [(iteration, {name: float})], one entry per iteration
    valid_losses: list  # [(iteration, {name: float})], one entry per evaluation


def pretrain(datasets_provider, model_provider, forward_step_provider, *, argv=None,
             extra_args_provider=None, args_defaults=None, log=print_rank_0):
    """Parse Megatron's flags from ``argv`` and train. Returns a ``PretrainResult``."""
    args = parse_args(argv, extra_args_provider, defaults=args_defaults)
    return run_pretraining(args, datasets_provider, model_provider, forward_step_provider, log)


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


def run_pretraining(args, datasets_provider, model_provider, forward_step_provider,
                    log=print_rank_0):
    start_time = time.time()
    device = select_device(args.device)
    args.device = str(device)
    set_random_seed(args.seed)
    parallel = ParallelState(rng_tracker=build_rng_tracker(args.seed, tp_rank=0))
    tokenizer = build_tokenizer_from_args(args, log)

    model = model_provider(args, parallel).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f" > number of parameters: {n_params}")
    optimizer = build_optimizer(model, args=args, log=log)
    scheduler = build_scheduler(args, optimizer)
    state, _ = load_checkpoint(args, model, optimizer, scheduler, parallel.rng_tracker, log=log)
    if args.load is not None and (args.no_load_optim or args.finetune):
        optimizer.reload_model_params()

    train_iter, valid_iter, test_iter = build_data_iterators(args, state, tokenizer,
                                                             datasets_provider, log)
    forward_step = forward_step_provider(args, tokenizer)
    logger = TrainingLogger(args, flops_per_iteration(args), log=log)
    log(f"setup done in {time.time() - start_time:.1f} s; training on {device}")

    try:
        if not args.skip_train and state.iteration < args.train_iters:
            train(args, state, forward_step, model, optimizer, scheduler, train_iter, valid_iter,
                  logger, start_time, log, rng_tracker=parallel.rng_tracker)
        if args.eval_iters > 0 and valid_iter is not None:
            run_evaluation(args, state, forward_step, model, valid_iter, logger,
                           f"iteration {state.iteration} on validation set")
        if args.eval_iters > 0 and test_iter is not None:
            run_evaluation(args, state, forward_step, model, test_iter, logger,
                           f"iteration {state.iteration} on test set", count_valid=False)
    finally:
        logger.close()
    return PretrainResult(state, model, logger.train_history, logger.valid_history)


def build_scheduler(args, optimizer):
    steps = scheduler_steps_from_args(args)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=steps.lr_warmup_steps, lr_decay_steps=steps.lr_decay_steps,
        lr_decay_style=args.lr_decay_style, start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay, wd_incr_steps=steps.wd_incr_steps,
        wd_incr_style=args.weight_decay_incr_style,
        lr_warmup_tokens=steps.lr_warmup_tokens, lr_decay_tokens=steps.lr_decay_tokens,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler)


def resolve_train_iters(args):
    """Megatron's iteration bound: from --train-samples, or from a --train-tokens budget."""
    if args.train_iters is not None:
        return args.train_iters
    if args.train_samples is not None:
        args.train_iters = args.train_samples // args.global_batch_size
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


def build_data_iterators(args, state, tokenizer, datasets_provider, log):
    from megatron.data.samplers import build_pretraining_data_loader

    resolve_train_iters(args)
    num_samples = train_valid_test_num_samples(args)
    log(" > datasets target sizes (minimum size):")
    log(f"    train:      {num_samples[0]}")
    log(f"    validation: {num_samples[1]}")
    log(f"    test:       {num_samples[2]}")
    train_ds, valid_ds, test_ds = datasets_provider(args, tokenizer, num_samples)

    def loader(dataset, consumed):
        if dataset is None:
            return None
        return iter(build_pretraining_data_loader(
            dataset, consumed, args.micro_batch_size, dp_rank=0,
            dp_size=args.data_parallel_size, num_workers=args.num_workers,
            dataloader_type=args.dataloader_type, seed=args.seed))

    return (loader(train_ds, state.consumed_train_samples),
            loader(valid_ds, state.consumed_valid_samples),
            loader(test_ds, 0))


def flops_per_iteration(args):
    """Model FLOPs of one iteration (Narayanan et al. 2021, eq. 3; 72 without recompute)."""
    from megatron.model.utils import gpt_flops_per_iteration

    return gpt_flops_per_iteration(args.global_batch_size, args.seq_length, args.num_layers,
                                   args.hidden_size, args.padded_vocab_size,
                                   ffn_hidden_size=args.ffn_hidden_size,
                                   recompute=args.recompute_granularity == "full")


def train_step(args, forward_step, data_iterator, model, optimizer):
    """One optimizer step over ``args.num_micro_batches`` micro-batches (gradient accumulation).

    Returns (loss_dict averaged over micro-batches, update_successful, grad_norm).
    """
    optimizer.zero_grad()
    model.train()
    losses = {}
    for _ in range(args.num_micro_batches):
        output, loss_func = forward_step(data_iterator, model)
        loss, reported = loss_func(output)
        optimizer.scale_loss(loss / args.num_micro_batches).backward()
        for key, value in reported.items():
            losses[key] = losses.get(key, 0.0) + float(value) / args.num_micro_batches
    update_successful, grad_norm, _ = optimizer.step()
    return losses, update_successful, grad_norm


@torch.no_grad()
def evaluate(args, forward_step, data_iterator, model, eval_iters):
    """Average of each reported loss over ``eval_iters`` global batches (no dropout)."""
    model.eval()
    totals = {}
    for _ in range(eval_iters):
        for _ in range(args.num_micro_batches):
            output, loss_func = forward_step(data_iterator, model)
            _, reported = loss_func(output)
            for key, value in reported.items():
                totals[key] = totals.get(key, 0.0) + float(value)
    model.train()
    n = eval_iters * args.num_micro_batches
    return {key: value / n for key, value in totals.items()}


def run_evaluation(args, state, forward_step, model, data_iterator, logger, prefix,
                   count_valid=True):
    try:
        losses = evaluate(args, forward_step, data_iterator, model, args.eval_iters)
    except StopIteration:
        logger.log(f" > evaluation skipped at {prefix}: the dataset is exhausted")
        return None
    if count_valid:
        state.consumed_valid_samples += args.eval_iters * args.global_batch_size
    logger.validation(prefix, losses, state.iteration, state.consumed_train_samples,
                      state.consumed_train_tokens)
    return losses


def _should_exit(args, state, start_time):
    """(exit, reason) for the stop conditions other than --train-iters."""
    if args.train_tokens is not None and state.consumed_train_tokens >= args.train_tokens:
        return True, f"consumed {state.consumed_train_tokens} tokens (--train-tokens)"
    if args.exit_interval and state.iteration % args.exit_interval == 0:
        return True, f"iteration {state.iteration} is a multiple of --exit-interval"
    if args.exit_duration_in_mins is not None:
        minutes = (time.time() - start_time) / 60.0
        if minutes > args.exit_duration_in_mins:
            return True, f"ran {minutes:.1f} minutes (--exit-duration-in-mins)"
    return False, ""


def train(args, state, forward_step, model, optimizer, scheduler, train_iter, valid_iter,
          logger, start_time, log, rng_tracker=None):
    """Run iterations until --train-iters or another stop condition; save as requested."""
    tokens_per_iteration = args.global_batch_size * args.seq_length

    def save():
        if args.save is not None:
            save_checkpoint(args, state, model, optimizer, scheduler, rng_tracker, log=log)

    saved_at = None
    while state.iteration < args.train_iters:
        losses, ok, grad_norm = train_step(args, forward_step, train_iter, model, optimizer)
        if ok:
            # As Megatron-DeepSpeed: the scheduler sees the tokens consumed before this step.
            scheduler.step(increment=args.global_batch_size,
                           token_num=state.consumed_train_tokens)
        state.iteration += 1
        state.consumed_train_samples += args.global_batch_size
        state.consumed_train_tokens += tokens_per_iteration
        if not ok:
            state.skipped_iters += 1
        elif any(math.isnan(v) or math.isinf(v) for v in losses.values()):
            state.nan_iters += 1
        lr = optimizer.param_groups[0]["lr"]
        logger.training_step(state, losses, lr, grad_norm, float(optimizer.get_loss_scale()),
                             skipped=not ok)

        if args.eval_interval and state.iteration % args.eval_interval == 0 \
                and args.eval_iters > 0 and valid_iter is not None:
            run_evaluation(args, state, forward_step, model, valid_iter, logger,
                           f"iteration {state.iteration}")
        if args.save_interval and state.iteration % args.save_interval == 0:
            save()
            saved_at = state.iteration
        stop, reason = _should_exit(args, state, start_time)
        if stop:
            log(f"exiting at iteration {state.iteration}: {reason}")
            break
    if saved_at != state.iteration:
        save()
