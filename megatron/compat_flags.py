"""Flags of Megatron-DeepSpeed's and Megatron-LM's published launch scripts, and the ``args``
fields their checkpoint tools read.

The launch scripts (their command lines, expanded for their ranks, are checked in under
``tests/assets/launch_scripts``) pass flags that belong to DeepSpeed's engine or to kernels this
framework does not have. Each one is either mapped onto its native equivalent here, or accepted
with ONE warning line (rank 0, at start-up) saying what it would have done, or -- where running
without it would silently train something else -- refused by name:

- ``--deepspeed``, ``--zero-stage N`` and the DeepSpeed JSON's precision, clipping, batch and
  ZeRO entries: DeepSpeed's engine, or without ``--deepspeed`` their native equivalents (ZeRO-1
  = ``--use-distributed-optimizer``) or a refusal by name (``megatron.ds.config``).
- ``--no-pipeline-parallel``: DeepSpeed's non-pipelined model; requires a pipeline size of 1.
- ``--deepspeed-activation-checkpointing``: DeepSpeed's implementation of Megatron's activation
  recompute; with ``--checkpoint-activations`` our recompute does the same, alone it does nothing
  (as there) and says so in one warning line.
- ``--attention-backend``: Megatron-LM's kernel choice -> ours (``megatron.model.config``
  ``attention_backend``): flash and fused -> torch's SDPA, unfused and local -> our
  ``core_attention`` (Megatron's CoreAttention), auto -> the default selection;
  ``--use-flash-attn`` (and Megatron-DeepSpeed's ``-v1``/``-v2``/``-triton``) = flash.
- ``--log-optimizer-states-to-tensorboard``: the norms of Adam's moments and of the weights
  in TensorBoard under Megatron-DeepSpeed's tags (``megatron.optim.state_stats``).
- ``--data-efficiency-curriculum-learning``: refused (curriculum learning reorders the data;
  running without it would be another experiment).

``add_megatron_saved_fields`` fills the ``args`` fields that Megatron-LM / Megatron-DeepSpeed
always save and that converters written for their checkpoints read (list and sources:
``tests/assets/launch_scripts/megatron_saved_args_fields.txt``), each with Megatron's meaning
for this model.
"""

import sys

from megatron.errors import NotImplementedYet, UserError

ATTENTION_BACKENDS = {  # Megatron-LM's --attention-backend -> our kernel choice
    "auto": "auto", "flash": "sdpa", "fused": "sdpa", "unfused": "core", "local": "core"}


def add_compat_args(parser):
    """The launch scripts' DeepSpeed / Megatron-LM flags (names and defaults as there)."""
    g = parser.add_argument_group("Megatron-DeepSpeed / Megatron-LM compatibility")
    g.add_argument("--deepspeed", action="store_true",
                   help="Train through DeepSpeed's engine (ZeRO 1/2/3, its fp16/bf16).")
    g.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                   help="DeepSpeed ZeRO stage; natively 1 = --use-distributed-optimizer, "
                        "2 and 3 need --deepspeed.")
    g.add_argument("--no-pipeline-parallel", action="store_true",
                   help="Megatron-DeepSpeed: no pipeline engine (pipeline size must be 1).")
    g.add_argument("--deepspeed-activation-checkpointing", action="store_true",
                   help="DeepSpeed's activation recompute: ours with --checkpoint-activations.")
    g.add_argument("--attention-backend", default="auto", choices=sorted(ATTENTION_BACKENDS),
                   help="Attention kernel (Megatron-LM): flash/fused -> torch SDPA, "
                        "unfused/local -> Megatron's CoreAttention, auto -> the default choice.")
    g.add_argument("--use-flash-attn", "--use-flash-attn-v1", "--use-flash-attn-v2",
                   "--use-flash-attn-triton", dest="use_flash_attn", action="store_true",
                   help="Megatron-LM / Megatron-DeepSpeed's FlashAttention switches: "
                        "--attention-backend flash.")
    g.add_argument("--log-optimizer-states-to-tensorboard", action="store_true",
                   help="Megatron-DeepSpeed's optimizer/* TensorBoard tags: L1/L2 norms and "
                        "largest values of Adam's moments and of the weights.")
    g.add_argument("--data-efficiency-curriculum-learning", action="store_true",
                   help="Megatron-DeepSpeed's curriculum learning (not implemented: refused).")
    # Kernel-fusion switches Megatron saves in args: no effect on the math here.
    g.add_argument("--no-masked-softmax-fusion", dest="masked_softmax_fusion",
                   action="store_false", help="Accepted; kernels are chosen by "
                                              "--attention-backend.")
    g.add_argument("--no-bias-dropout-fusion", dest="bias_dropout_fusion", action="store_false",
                   help="Accepted; bias-dropout-add is the same computation either way.")
    g.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion",
                   action="store_false",
                   help="Accepted; fusing the weight-gradient accumulation changes no result.")
    g.add_argument("--no-async-tensor-model-parallel-allreduce",
                   dest="async_tensor_model_parallel_allreduce", action="store_false",
                   help="Accepted; overlapping the TP all-reduce changes no result.")
    g.add_argument("--apply-query-key-layer-scaling", dest="apply_query_key_layer_scaling",
                   action="store_true",
                   help="Accepted: Q.K^T / layer number rescaled in an fp32 softmax equals the "
                        "plain fp32 softmax this model always computes.")
    g.add_argument("--no-query-key-layer-scaling", dest="apply_query_key_layer_scaling",
                   action="store_false")
    g.add_argument("--attention-softmax-in-fp32", action="store_true", default=True,
                   help="Always on here (the softmax runs in fp32).")


def apply_compat_args(args):
    """Map the compatibility flags onto native options (mutates ``args``); returns the warning
    lines (one per flag). Raises UserError for a flag that cannot run natively."""
    if args.data_efficiency_curriculum_learning:
        raise NotImplementedYet("--data-efficiency-curriculum-learning: Megatron-DeepSpeed's "
                                "curriculum learning is not implemented; leave the flag out")
    # --zero-stage and the DeepSpeed JSON's fp16/bf16/ZeRO/clipping/batch entries
    from megatron.ds.config import apply_deepspeed_json

    apply_deepspeed_json(args)
    if args.use_flash_attn:  # the older switch of --attention-backend flash
        if args.attention_backend not in ("auto", "flash"):
            raise UserError(f"--use-flash-attn contradicts --attention-backend "
                            f"{args.attention_backend}")
        args.attention_backend = "flash"
    if args.no_pipeline_parallel and args.pipeline_model_parallel_size != 1:
        raise UserError(f"--no-pipeline-parallel contradicts --pipeline-model-parallel-size "
                        f"{args.pipeline_model_parallel_size} (it needs 1)")
    warnings = []
    if args.deepspeed_activation_checkpointing and not (
            args.checkpoint_activations or args.recompute_granularity):
        warnings.append("--deepspeed-activation-checkpointing has no effect without "
                        "--checkpoint-activations (it selects DeepSpeed's implementation of "
                        "activation recompute, which this run does not use)")
    return warnings


def emit_warnings(args, warnings):
    """One line per warning on stderr, by rank 0 only."""
    if getattr(args, "rank", 0) == 0:
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr, flush=True)


def add_megatron_saved_fields(args):
    """Fields Megatron-LM / Megatron-DeepSpeed derive in validate_args and save in every
    checkpoint, with their meaning for this model (LayerNorm, GeLU MLP, multi-head attention,
    no virtual pipeline). ``params_dtype`` is the torch dtype, as there."""
    from megatron.arguments import params_torch_dtype

    args.params_dtype = params_torch_dtype(args)
    args.norm_epsilon = args.layernorm_epsilon  # Megatron-LM's newer name
    derived = dict(
        normalization="LayerNorm", apply_layernorm_1p=False,
        add_position_embedding=args.position_embedding_type == "learned_absolute",
        add_qkv_bias=args.add_bias_linear, swiglu=False, squared_relu=False,
        group_query_attention=False, rotary_interleaved=False,
        num_query_groups=args.num_attention_heads,  # one key/value head per query head
        fp16_lm_cross_entropy=False, fp32_residual_connection=False,
        data_parallel_random_init=False, virtual_pipeline_model_parallel_size=None,
        encoder_num_layers=args.num_layers, encoder_seq_length=args.seq_length,
        transformer_impl="local", onnx_safe=None)
    for name, value in derived.items():
        # A value already there came from a checkpoint (--use-checkpoint-args): keep it, so
        # transformer_config_from_args still refuses an architecture this model lacks.
        if getattr(args, name, None) is None:
            setattr(args, name, value)
