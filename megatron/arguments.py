"""Megatron-LM command-line flags -> one validated namespace.

Flag names and defaults follow Megatron-LM / Megatron-DeepSpeed so existing launch scripts work.
The result is an ``argparse.Namespace`` (it is what Megatron stores under ``args`` in every
checkpoint); everything derived from the flags (data-parallel size, number of micro-batches,
padded vocabulary, ...) is computed here once, and every user mistake is reported as a
``UserError`` that names the flag. Model code never sees this namespace: it receives the small
``TransformerConfig`` built by ``transformer_config_from_args``.
"""

import argparse
import os
import sys

from megatron.compat_flags import ATTENTION_BACKENDS
from megatron.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as a one-line ``UserError`` instead of usage + exit."""

    def error(self, message):
        raise UserError(message)


def build_parser(extra_args_provider=None):
    parser = _Parser(description="Megatron-LTD arguments", allow_abbrev=False)
    for add in (_add_network_size_args, _add_regularization_args, _add_training_args,
                _add_initialization_args, _add_learning_rate_args, _add_checkpointing_args,
                _add_mixed_precision_args, _add_distributed_args, _add_validation_args,
                _add_data_args, _add_logging_args):
        add(parser)
    from megatron.compat_flags import add_compat_args
    from megatron.ltd.config import add_random_ltd_args

    add_random_ltd_args(parser)
    add_compat_args(parser)
    if extra_args_provider is not None:
        extra_args_provider(parser)
    return parser


def parse_args(argv=None, extra_args_provider=None, world_size=None, defaults=None):
    """Parse ``argv`` (default: sys.argv) and validate. ``world_size`` defaults to the
    launcher's (torchrun's $WORLD_SIZE, an srun step's task count, else 1)."""
    parser = build_parser(extra_args_provider)
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.use_checkpoint_args:  # Megatron-LM's: the model's shape from the checkpoint
        from megatron.checkpoint_args import apply_checkpoint_args, given_dests

        apply_checkpoint_args(args, given_dests(parser, argv if argv is not None
                                                else sys.argv[1:]))
    if world_size is None:
        from megatron.parallel.initialize import read_distributed_env
        world_size = read_distributed_env().world_size  # torchrun's, an srun step's, or 1
    return validate_args(args, world_size)


# ----------------------------------------------------------------------------------------------
# validation


def _require(cond, message):
    if not cond:
        raise UserError(message)


def _check_virtual_pipeline(args, pp):
    """--num-layers-per-virtual-pipeline-stage (the interleaved 1F1B schedule): as Megatron-LM,
    sets ``virtual_pipeline_model_parallel_size`` (model chunks per stage)."""
    from megatron.parallel.pipeline_utils import virtual_pipeline_size

    flag = "--num-layers-per-virtual-pipeline-stage"
    _require(pp > 1, f"{flag} needs --pipeline-model-parallel-size > 1")
    _require(args.pipeline_layer_split is None,
             f"{flag} and --pipeline-layer-split are mutually exclusive (the chunks are equal)")
    _require(not args.deepspeed, f"{flag}: the interleaved schedule is not available through "
                                 f"DeepSpeed's engine (--deepspeed)")
    args.virtual_pipeline_model_parallel_size = virtual_pipeline_size(
        args.num_layers, pp, args.num_layers_per_virtual_pipeline_stage)
    _require(args.num_micro_batches % pp == 0,
             f"{flag}: the interleaved schedule needs the micro-batches per step "
             f"({args.num_micro_batches} = --global-batch-size / (--micro-batch-size x "
             f"data-parallel size)) to be a multiple of --pipeline-model-parallel-size {pp}")


def validate_args(args, world_size=1):
    """Fill derived values and check flag combinations; raises UserError naming the flag."""
    from megatron.compat_flags import (add_megatron_saved_fields, apply_compat_args,
                                       emit_warnings)

    args.world_size = world_size
    args.rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    # Launch-script flags of Megatron-DeepSpeed / Megatron-LM: mapped, refused, or one warning.
    emit_warnings(args, apply_compat_args(args))

    # -- parallel layout
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    _require(tp >= 1 and pp >= 1, "--tensor-model-parallel-size and "
             "--pipeline-model-parallel-size must be >= 1")
    _require(world_size % (tp * pp) == 0,
             f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
             f"--pipeline-model-parallel-size {pp}")
    args.data_parallel_size = world_size // (tp * pp)

    # -- model shape
    for flag in ("num_layers", "hidden_size", "num_attention_heads"):
        _require(getattr(args, flag) is not None, f"--{flag.replace('_', '-')} is required")
        _require(getattr(args, flag) > 0, f"--{flag.replace('_', '-')} must be positive")
    _require(args.hidden_size % args.num_attention_heads == 0 or args.kv_channels is not None,
             f"--num-attention-heads {args.num_attention_heads} must divide --hidden-size "
             f"{args.hidden_size} (or give --kv-channels)")
    _require(args.num_attention_heads % tp == 0,
             f"--num-attention-heads {args.num_attention_heads} is not divisible by "
             f"--tensor-model-parallel-size {tp}")
    _require(args.num_layers >= pp,
             f"--num-layers {args.num_layers} cannot be split over "
             f"--pipeline-model-parallel-size {pp}")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    _require(args.rotary_base > 0, f"--rotary-base must be positive, got {args.rotary_base}")
    _require(args.seq_length is not None, "--seq-length is required")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    _require(args.position_embedding_type == "rope"
             or args.max_position_embeddings >= args.seq_length,
             f"--max-position-embeddings {args.max_position_embeddings} is smaller than "
             f"--seq-length {args.seq_length}")

    # -- batch sizes (--step-batch-size-schedule sets the global batch: its final one)
    from megatron.batch_rampup import parse_rampup, step_schedule_global_batch

    step_schedule_global_batch(args)
    _require(args.micro_batch_size is not None and args.micro_batch_size > 0,
             "--micro-batch-size is required and must be positive")
    dp = args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    _require(args.global_batch_size % (args.micro_batch_size * dp) == 0,
             f"--global-batch-size {args.global_batch_size} is not divisible by "
             f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}")
    args.num_micro_batches = args.global_batch_size // (args.micro_batch_size * dp)

    # -- training length: iterations, samples, or tokens
    given = [f for f in ("train_iters", "train_samples") if getattr(args, f) is not None]
    _require(len(given) <= 1, "--train-iters and --train-samples are mutually exclusive")
    if not given and args.train_tokens is None and args.train_layer_tokens is None \
            and not args.skip_train:
        raise UserError("give one of --train-iters, --train-samples, --train-tokens or "
                        "--train-layer-tokens")
    if args.train_iters is None and args.train_samples is None \
            and args.train_layer_tokens is None:
        # Token budget only: the LR schedule runs on tokens; the loop's iteration bound is
        # derived from the budget (training.resolve_train_iters).
        _require(args.lr_warmup_iters == 0 and args.lr_decay_iters is None
                 and args.lr_warmup_samples == 0 and args.lr_decay_samples is None,
                 "with --train-tokens alone, give the warmup as --lr-warmup-tokens or "
                 "--lr-warmup-fraction (not --lr-warmup-iters/--lr-warmup-samples)")
    if args.train_iters is not None:
        _require(args.lr_decay_samples is None and args.lr_warmup_samples == 0,
                 "--lr-decay-samples/--lr-warmup-samples go with --train-samples, "
                 "not --train-iters")
    if args.train_samples is not None:
        _require(args.lr_decay_iters is None and args.lr_warmup_iters == 0,
                 "--lr-decay-iters/--lr-warmup-iters go with --train-iters, "
                 "not --train-samples")
    _require(args.lr_warmup_fraction is None or (args.lr_warmup_iters == 0
                                                 and args.lr_warmup_samples == 0),
             "--lr-warmup-fraction cannot be combined with --lr-warmup-iters/--lr-warmup-samples")
    _require(args.lr is not None or args.skip_train, "--lr is required")
    if args.min_lr is not None and args.lr is not None:
        _require(args.min_lr <= args.lr, f"--min-lr {args.min_lr} is larger than --lr {args.lr}")

    parse_rampup(args)  # --rampup-batch-size / --step-batch-size-schedule: a growing batch

    # -- precision
    _require(not (args.fp16 and args.bf16), "--fp16 and --bf16 are mutually exclusive")
    args.params_dtype = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    # As Megatron: bf16 always accumulates and all-reduces gradients in fp32 main_grad buffers.
    # fp16 does so only when asked; for fp32 the gradients are fp32 already and the flag is
    # ignored (set to False: the run is the same either way).
    if args.bf16:
        args.accumulate_allreduce_grads_in_fp32 = True
    elif not args.fp16:
        args.accumulate_allreduce_grads_in_fp32 = False

    # -- weight decay schedule (Megatron's rule: the start/end values belong to a schedule, so
    # they are required with linear/cosine and refused with constant, where --weight-decay is
    # the value; anything else leaves it ambiguous which value the run used)
    if args.weight_decay_incr_style == "constant":
        _require(args.start_weight_decay is None and args.end_weight_decay is None,
                 "--start-weight-decay/--end-weight-decay need --weight-decay-incr-style linear "
                 "or cosine (with constant, give --weight-decay)")
        args.start_weight_decay = args.end_weight_decay = args.weight_decay
    else:
        _require(args.start_weight_decay is not None and args.end_weight_decay is not None,
                 f"--weight-decay-incr-style {args.weight_decay_incr_style} needs "
                 "--start-weight-decay and --end-weight-decay")

    # -- recompute (Megatron-DeepSpeed's --checkpoint-activations is full recompute). Full
    # recompute here checkpoints every layer on its own: Megatron-LM's --recompute-method uniform
    # --recompute-num-layers 1, which its launch scripts pass with --recompute-granularity full.
    if args.checkpoint_activations:
        args.recompute_granularity = "full"
    if args.recompute_granularity == "full":
        _require(args.recompute_method in (None, "uniform"),
                 f"--recompute-method {args.recompute_method} is not supported: full recompute "
                 "checkpoints each layer (--recompute-method uniform --recompute-num-layers 1)")
        _require(args.recompute_num_layers in (None, 1),
                 f"--recompute-num-layers {args.recompute_num_layers} is not supported: full "
                 "recompute checkpoints each layer on its own (--recompute-num-layers 1)")
        args.recompute_method, args.recompute_num_layers = "uniform", 1

    # -- data
    if not args.skip_train and not args.mock_data and getattr(args, "task", None) is None:
        # (tasks/main.py reads --train-data / --valid-data instead)
        _require(args.data_path or args.train_data_path,
                 "--data-path (or --train-data-path) is required unless --mock-data is given")
    _require(args.data_impl in ("mmap", "infer"),
             f"--data-impl {args.data_impl}: only the mmap (MMIDIDX) format is supported")

    # -- checkpoints
    if args.save is not None and args.save_interval is None:
        args.save_interval = 0  # save only at the end
    _require(args.save_interval is None or args.save_interval >= 0,
             "--save-interval must be >= 0")
    _require(args.log_interval > 0, "--log-interval must be positive")
    _require(args.eval_interval > 0, "--eval-interval must be positive")

    # -- parallel options
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron: nothing to split at TP 1
    if args.sequence_parallel:
        _require(args.seq_length % tp == 0,
                 f"--sequence-parallel needs --seq-length {args.seq_length} divisible by "
                 f"--tensor-model-parallel-size {tp}")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        _check_virtual_pipeline(args, pp)
    if args.pipeline_layer_split is not None:
        from megatron.parallel.pipeline_utils import parse_layer_split, stage_layer_ids

        args.pipeline_layer_split = parse_layer_split(args.pipeline_layer_split)
        stage_layer_ids(args.num_layers, pp, 0, args.pipeline_layer_split)  # validates
    elif pp > 1:
        _require(args.num_layers % pp == 0,
                 f"--num-layers {args.num_layers} is not divisible by "
                 f"--pipeline-model-parallel-size {pp} (or give --pipeline-layer-split)")

    # -- BERT data
    _require(0.0 < args.mask_prob < 1.0, f"--mask-prob must be in (0, 1), got {args.mask_prob}")
    _require(0.0 < args.short_seq_prob <= 1.0,
             f"--short-seq-prob must be in (0, 1], got {args.short_seq_prob}")

    # random-LTD / layer-token options (flags and DeepSpeed JSON): fail early on bad values.
    from megatron.ltd.config import apply_random_ltd_preset, random_ltd_config_from_args

    apply_random_ltd_preset(args)
    random_ltd_config_from_args(args)

    # Our earlier checkpoints name the bias flag by its negation; keep both names in args.
    args.disable_bias_linear = not args.add_bias_linear

    # Bookkeeping that Megatron keeps on args (and so in checkpoints).
    args.consumed_train_samples = 0
    args.consumed_valid_samples = 0
    args.consumed_train_tokens = 0
    args.padded_vocab_size = None  # set once the tokenizer is built
    add_megatron_saved_fields(args)
    return args


def params_torch_dtype(args):
    """torch dtype of the parameters and activations (--fp16 / --bf16 / fp32)."""
    import torch

    dtype = getattr(args, "params_dtype", "fp32")
    if isinstance(dtype, torch.dtype):  # Megatron-LM's own args hold the torch dtype
        return dtype
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


_PARSER_DEFAULTS = None


def flag_defaults():
    """{dest: default} of every flag (cached)."""
    global _PARSER_DEFAULTS
    if _PARSER_DEFAULTS is None:
        parser = build_parser()
        defaults = {}
        for a in parser._actions:  # the first action of a dest sets its default, as argparse
            if a.dest != "help" and a.default is not argparse.SUPPRESS:
                defaults.setdefault(a.dest, a.default)
        _PARSER_DEFAULTS = defaults
    return _PARSER_DEFAULTS


# Megatron-LM architecture flags this model does not implement; some leave every tensor shape
# unchanged, so the weights of such a checkpoint would load into a different network.
_UNSUPPORTED_ARCHITECTURE = (
    ("swiglu", "--swiglu"), ("squared_relu", "--squared-relu"),
    ("group_query_attention", "--group-query-attention"),
    ("rotary_interleaved", "--rotary-interleaved"))


def transformer_config_from_args(args, **overrides):
    """The model's own small config (no parallel or training flags): the one mapping from
    flags to model, for runs and for the ``args`` saved in checkpoints alike. Flags that an
    older checkpoint's ``args`` lack take the parser's defaults; ``overrides`` set config
    fields that are the model family's, not a flag's (BERT's ``num_tokentypes``)."""
    from megatron.model.config import TransformerConfig

    defaults = flag_defaults()

    def get(name):
        return getattr(args, name, defaults.get(name))

    unsupported = [flag for name, flag in _UNSUPPORTED_ARCHITECTURE if get(name)]
    if getattr(args, "onnx_safe", None) and not get("openai_gelu"):
        unsupported.append("--onnx-safe (Megatron's erf_gelu, erf(x / 1.41421))")
    normalization = getattr(args, "normalization", None)
    if normalization not in (None, "LayerNorm", "layernorm"):
        unsupported.append(f"--normalization {normalization}")
    if unsupported:
        raise UserError(f"{', '.join(unsupported)}: not implemented by this model (LayerNorm, "
                        f"GeLU MLP, multi-head attention only)")
    add_bias_linear = getattr(args, "add_bias_linear", None)
    if add_bias_linear is None:  # our checkpoints before add_bias_linear was stored
        add_bias_linear = not getattr(args, "disable_bias_linear", False)
    position_type = get("position_embedding_type") or "learned_absolute"
    if get("use_rotary_position_embeddings"):
        position_type = "rope"
    fields = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=get("ffn_hidden_size"),
        kv_channels=get("kv_channels"),
        seq_length=args.seq_length,
        max_position_embeddings=get("max_position_embeddings"),
        padded_vocab_size=args.padded_vocab_size,
        hidden_dropout=get("hidden_dropout"),
        attention_dropout=get("attention_dropout"),
        layernorm_epsilon=get("layernorm_epsilon"),
        init_method_std=get("init_method_std"),
        position_embedding_type=position_type,
        rotary_percent=get("rotary_percent"),
        rope_theta=get("rotary_base"),
        untie_embeddings_and_output_weights=bool(get("untie_embeddings_and_output_weights")),
        add_bias_linear=bool(add_bias_linear),
        openai_gelu=bool(get("openai_gelu")),
        bias_gelu_fusion=bool(get("bias_gelu_fusion")),
        apply_residual_connection_post_layernorm=bool(
            get("apply_residual_connection_post_layernorm")),
        params_dtype=params_torch_dtype(args),
        recompute_granularity=get("recompute_granularity"),
        sequence_parallel=bool(get("sequence_parallel")),
        pack_padded_tokens=bool(get("pack_padded_tokens")),
        attention_backend=ATTENTION_BACKENDS[get("attention_backend") or "auto"],
        init_seed=get("seed"),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


# ----------------------------------------------------------------------------------------------
# flag groups (names and defaults as Megatron-LM / Megatron-DeepSpeed)


def _add_network_size_args(parser):
    g = parser.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, default=None, help="Transformer hidden size.")
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="MLP hidden size (default 4 * hidden size).")
    g.add_argument("--num-attention-heads", type=int, default=None,
                   help="Number of attention heads.")
    g.add_argument("--kv-channels", type=int, default=None,
                   help="Projection size per head (default hidden size / heads).")
    g.add_argument("--seq-length", type=int, default=None, help="Training sequence length.")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="Size of the position embedding table (default --seq-length).")
    g.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope"], help="Position embedding type.")
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="Alias of --position-embedding-type rope (Megatron-DeepSpeed).")
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="Fraction of each head's channels rotated by rope.")
    g.add_argument("--rotary-base", type=float, default=10000.0,
                   help="Base (theta) of rope's frequencies (Megatron-LM's flag; default 10000).")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the vocabulary to a multiple of this (times TP size).")
    g.add_argument("--layernorm-epsilon", "--norm-epsilon", dest="layernorm_epsilon", type=float,
                   default=1e-5, help="LayerNorm epsilon (--norm-epsilon: Megatron-LM's name).")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="Separate output layer instead of the tied word embeddings.")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear",
                   help="No biases in the linear layers (Megatron's args.add_bias_linear).")
    g.add_argument("--openai-gelu", action="store_true",
                   help="The tanh-approximate GeLU (GPT-2's gelu_new) in the MLP and BERT's LM "
                        "head.")
    g.add_argument("--no-bias-gelu-fusion", action="store_false", dest="bias_gelu_fusion",
                   help="No fused bias-GeLU: the exact erf GeLU in the MLP (Megatron's fusion "
                        "computes the tanh approximation; off without biases).")
    g.add_argument("--apply-residual-connection-post-layernorm", action="store_true",
                   help="Post-LN residuals, as the original BERT (default: pre-LN).")
    g.add_argument("--bert-no-binary-head", action="store_false", dest="bert_binary_head",
                   help="BERT without the pooler and sentence-order (binary) head.")
    g.add_argument("--bert-binary-head", action="store_true", dest="bert_binary_head",
                   help="BERT with the sentence-order head (the default; Megatron-LM's flag).")
    g.add_argument("--no-pack-padded-tokens", action="store_false", dest="pack_padded_tokens",
                   help="BERT: compute every layer at padded positions too, as Megatron-LM "
                        "(default: the layers run on the batch's real tokens only, packed; the "
                        "real tokens' results are the same).")


def _add_regularization_args(parser):
    g = parser.add_argument_group("regularization")
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--weight-decay-incr-style", default="constant",
                   choices=["constant", "linear", "cosine"])
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="Gradient clipping by global norm (0 disables).")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)


def _add_training_args(parser):
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="Samples per micro-batch per data-parallel rank.")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Samples per optimizer step (default micro * DP); the rest is gradient "
                        "accumulation.")
    g.add_argument("--rampup-batch-size", nargs="*", default=None,
                   help="START INCREMENT SAMPLES: the global batch grows from START by "
                        "INCREMENT to --global-batch-size over SAMPLES consumed samples.")
    g.add_argument("--step-batch-size-schedule", default=None,
                   help='"0:BS0 T1:BS1 ...": the global batch from each token threshold on '
                        "(K/M/B/T suffixes; newer Megatron-LM); sample-based runs.")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="Recompute each layer's activations in backward.")
    g.add_argument("--recompute-granularity", default=None, choices=["full"])
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"],
                   help="Only uniform (with --recompute-num-layers 1) is supported.")
    g.add_argument("--recompute-num-layers", "--checkpoint-num-layers", type=int, default=None,
                   dest="recompute_num_layers", help="Layers per recompute chunk: only 1.")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--train-tokens", type=int, default=None,
                   help="Stop once this many tokens have been consumed.")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="Exit after the iteration that is a multiple of this.")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="Exit (after saving) once training has run this many minutes.")
    g.add_argument("--skip-train", action="store_true", help="Only evaluate.")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="On SIGTERM (or --exit-signal) save a checkpoint at the end of the "
                        "current iteration on every rank and exit 0; SIGINT the same after one "
                        "Ctrl-C, at once after a second.")
    g.add_argument("--exit-signal", default="SIGTERM",
                   help="The signal --exit-signal-handler catches besides SIGINT (e.g. SIGUSR1, "
                        "as `sbatch --signal=USR1@120` sends); SIGTERM is always caught.")
    g.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_true", default=True,
                   help="Stop with an error at an iteration whose loss or gradient norm is not "
                        "finite (fp16's skipped steps excepted); never save such a state "
                        "(default on).")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false")
    g.add_argument("--max-consecutive-skipped", type=int, default=100,
                   help="Stop a fp16 run whose loss scaler skipped this many steps in a row.")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--dataloader-type", default="single", choices=["single", "cyclic"])
    g.add_argument("--device", default=None,
                   help="Device type (cpu or cuda); default: cuda when available.")


def _add_initialization_args(parser):
    g = parser.add_argument_group("initialization")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--init-method-std", type=float, default=0.02)


def _add_learning_rate_args(parser):
    g = parser.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, default=None, help="Peak learning rate.")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root"])
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None)
    g.add_argument("--lr-decay-tokens", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-tokens", type=int, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0,
                   help="LR at the start of the warmup (linear from here to --lr).")
    g.add_argument("--override-opt_param-scheduler", "--override-lr-scheduler",
                   dest="override_opt_param_scheduler", action="store_true")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-lr-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true")


def _add_checkpointing_args(parser):
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="Directory to save checkpoints to.")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--load", default=None, help="Directory to load a checkpoint from.")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="Load model weights only and start from iteration 0.")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true")
    from megatron.checkpoint_files import add_read_flags

    add_read_flags(g)  # --unsafe-load-checkpoint, --no-verify-checkpoint (the tools' too)
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="Take the model's shape and tokenizer from the --load (or "
                        "--pretrained-checkpoint) checkpoint's args where not given here.")
    g.add_argument("--use-mp-args-from-checkpoint-args", action="store_true",
                   help="With --use-checkpoint-args, also the tensor/pipeline-parallel sizes.")


def _add_mixed_precision_args(parser):
    g = parser.add_argument_group("mixed precision")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None,
                   help="Static loss scale (default: dynamic).")
    g.add_argument("--initial-loss-scale", type=float, default=2 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="Accumulate micro-batch gradients in fp32 main_grad buffers and "
                        "all-reduce those over data-parallel ranks (forced on for --bf16; "
                        "ignored for fp32).")


def _add_distributed_args(parser):
    g = parser.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Split LayerNorm/dropout activations along the sequence over TP ranks.")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--pipeline-layer-split", default=None,
                   help="Layers per pipeline stage, e.g. 3,5 (default: even split).")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"],
                   help="Default: nccl when the run's --device is a GPU, else gloo.")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None)
    g.add_argument("--distributed-timeout-minutes", type=float, default=10,
                   help="Bound on every collective and point-to-point wait: a frozen or dead "
                        "peer ends every rank with an error after this long.")


def _add_validation_args(parser):
    g = parser.add_argument_group("validation")
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)


def _add_data_args(parser):
    g = parser.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="PREFIX, or W1 PREFIX1 W2 PREFIX2 ... to blend datasets.")
    g.add_argument("--split", default="969, 30, 1",
                   help="Train/valid/test proportions, e.g. 949,50,1.")
    g.add_argument("--train-data-path", nargs="*", default=None)
    g.add_argument("--valid-data-path", nargs="*", default=None)
    g.add_argument("--test-data-path", nargs="*", default=None)
    g.add_argument("--data-cache-path", default=None,
                   help="Where index caches are written (default: next to the data).")
    g.add_argument("--data-impl", default="infer", help="Only mmap is supported.")
    g.add_argument("--mock-data", action="store_true",
                   help="Random tokens instead of a dataset (benchmarks, smoke tests).")
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="For NullTokenizer.")
    g.add_argument("--vocab-extra-ids", type=int, default=0)
    g.add_argument("--tokenizer-type", default=None,
                   choices=["BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer",
                            "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                            "HFTokenizer", "NullTokenizer"])
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--num-workers", type=int, default=2, help="Dataloader worker processes.")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--mask-prob", type=float, default=0.15,
                   help="BERT: probability of masking a token (MLM).")
    g.add_argument("--short-seq-prob", type=float, default=0.1,
                   help="BERT: probability of a sample shorter than --seq-length.")


def _add_logging_args(parser):
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--tensorboard-log-interval", type=int, default=1)
    g.add_argument("--tensorboard-queue-size", type=int, default=1000)
    g.add_argument("--log-timers-to-tensorboard", action="store_true")
    g.add_argument("--log-batch-size-to-tensorboard", action="store_true")
    g.add_argument("--no-log-learnig-rate-to-tensorboard", dest="log_learning_rate_to_tensorboard",
                   action="store_false")
    g.add_argument("--no-log-loss-scale-to-tensorboard", dest="log_loss_scale_to_tensorboard",
                   action="store_false")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true")
    g.add_argument("--log-memory-to-tensorboard", action="store_true")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true")
    g.add_argument("--log-params-norm", action="store_true")
    g.add_argument("--log-num-zeros-in-grad", action="store_true")
