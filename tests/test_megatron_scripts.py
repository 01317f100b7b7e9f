"""Megatron-DeepSpeed's and Megatron-LM's published launch scripts run here unchanged (issue 13).

``tests/assets/launch_scripts/*.txt`` holds the command line of each published GPT / BERT
pretraining script (Megatron-DeepSpeed's data-efficiency and random-LTD examples, Megatron-LM's
GPT-3 and BERT examples), its shell variables expanded for the rank count in its ``# world-size``
header (64 where the script's layout allows it), with the DeepSpeed JSON it writes beside it.
For each one:

- without ``--deepspeed`` (the native path; DeepSpeed's engine has its own tests) every flag
  is accepted by our parser for the script's world size and acts as there: ZeRO-1 as the
  distributed optimizer, recompute, random-LTD from the JSON (the 2022 pre-release
  ``dynamic_train`` layout too), the batch ramp-up, the attention backend, the optimizer-state
  TensorBoard tags; a flag that cannot apply prints ONE warning line naming it; a script that
  cannot run as published is refused naming the flag (``# expect-refusal``);
- Megatron-LM's examples, sized for 8 or 128+ GPUs, are refused at 64 ranks in one line naming
  the flags (``# at-64-ranks``), as Megatron-LM's own checks refuse them;
- ``DRY_RUN=1 examples/run_slurm.sbatch`` prints the launch and accepts it for those ranks
  (64 for Megatron-DeepSpeed's scripts);
- a checkpoint of ours carries every ``args`` field that Megatron's checkpoint tools read
  (``megatron_saved_args_fields.txt``, with the tools named), with Megatron's meaning.
"""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from megatron.arguments import parse_args, transformer_config_from_args
from megatron.errors import NotImplementedYet, UserError
from training_helpers import MERGES, ROOT, VOCAB, gpt_argv, run

ASSETS = os.path.join(ROOT, "tests", "assets", "launch_scripts")
SCRIPTS = sorted(glob.glob(os.path.join(ASSETS, "*.txt")))
SCRIPTS = [p for p in SCRIPTS if not p.endswith("megatron_saved_args_fields.txt")]
# Flags accepted with one warning (what they would have done), when they cannot apply.
WARNS = ("--deepspeed-activation-checkpointing",)


def _header(path):
    """The ``# key: value`` lines of a checked-in command line."""
    lines = open(path, encoding="utf-8").read().splitlines()
    return {m.group(1): m.group(2).strip() for m in
            (re.match(r"# ([a-z0-9-]+): (.*)", line) for line in lines) if m}


def load_script(path):
    """(entry, argv, world size, expected refusal or None) of one checked-in command line."""
    lines = open(path, encoding="utf-8").read().splitlines()
    header = _header(path)
    words = shlex.split(" ".join(line for line in lines if not line.startswith("#"))
                        .replace("${ASSETS}", ASSETS))
    return words[0], words[1:], int(header["world-size"]), header.get("expect-refusal")


def test_every_published_script_names_its_source():
    names = {os.path.basename(p) for p in SCRIPTS}
    for expected in ("mds_data_efficiency_gpt_1.3B_random_ltd.txt",
                     "mds_data_efficiency_bert_336M_random_ltd.txt",
                     "mds_random_ltd_gpt_350M.txt", "mds_random_ltd_bert_large.txt",
                     "mlm_gpt3_175b_distributed.txt", "mlm_pretrain_gpt3_175B.txt",
                     "mlm_pretrain_bert_distributed.txt"):
        assert expected in names
    for path in SCRIPTS:
        text = open(path, encoding="utf-8").read()
        assert re.search(r"# Source: (microsoft/Megatron-DeepSpeed|NVIDIA/Megatron-LM)", text)
        entry, argv, world, _ = load_script(path)
        assert entry in ("pretrain_gpt.py", "pretrain_bert.py") and world >= 8 and argv
        if os.path.basename(path).startswith("mds_"):
            assert world == 64  # the data-efficiency recipes' 64 GPUs
        else:  # Megatron-LM's: sized for other rank counts, refused at 64 in one line
            assert world == 64 or "at-64-ranks" in _header(path)


def _entry_module(entry):
    import pretrain_bert
    import pretrain_gpt

    return {"pretrain_gpt.py": pretrain_gpt, "pretrain_bert.py": pretrain_bert}[entry]


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_published_script_parses_for_its_ranks(path, capsys):
    """The native path: the script's flags without --deepspeed (DeepSpeed's engine behind
    --deepspeed has its own tests)."""
    entry, argv, world, refusal = load_script(path)
    argv = [a for a in argv if a != "--deepspeed"]
    if refusal:
        with pytest.raises(UserError, match=re.escape(refusal)):
            parse_args(argv, world_size=world)
        return
    args = parse_args(argv, world_size=world)
    _entry_module(entry).PROVIDER.check_args(args)

    # One warning line per flag that cannot apply, naming it; none for the others.
    warned = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("warning: ")]
    expected = [f for f in WARNS if f in argv]
    if "--checkpoint-activations" in argv:  # DeepSpeed's recompute = ours: nothing to warn
        expected = [f for f in expected if f != "--deepspeed-activation-checkpointing"]
    assert sorted(line.split()[1] for line in warned) == sorted(expected)

    # ... and the others act as there.
    assert args.world_size == world and args.data_parallel_size * \
        args.tensor_model_parallel_size * args.pipeline_model_parallel_size == world
    if "--zero-stage" in argv:
        stage = int(argv[argv.index("--zero-stage") + 1])
        assert args.use_distributed_optimizer == (stage == 1)
    if "--checkpoint-activations" in argv:
        assert args.recompute_granularity == "full"
    if "--random-ltd" in argv:
        from megatron.ltd.config import random_ltd_config_from_args

        cfg = random_ltd_config_from_args(args)
        assert cfg.enabled and cfg.deepspeed_config
        assert cfg.layer_ids == tuple(range(1, args.num_layers - 1))  # all but first and last
    if "--rampup-batch-size" in argv:
        assert args.rampup_batch_size == [16, 16, 5859375]
    args.padded_vocab_size = 50304
    backend = transformer_config_from_args(args).attention_backend
    assert backend == ("sdpa" if "--use-flash-attn" in argv else "auto")


@pytest.mark.parametrize("path", [p for p in SCRIPTS if "at-64-ranks" in _header(p)],
                         ids=os.path.basename)
def test_script_sized_for_other_ranks_is_refused_at_64_in_one_line(path):
    """Megatron-LM's examples fix their global batch or layout for 8 GPUs or 128+; at 64 ranks
    each is refused in one line naming the flags (Megatron-LM's own checks refuse them too)."""
    _, argv, world, _ = load_script(path)
    assert world != 64
    with pytest.raises(UserError, match=re.escape(_header(path)["at-64-ranks"])):
        parse_args([a for a in argv if a != "--deepspeed"], world_size=64)


@pytest.mark.slow
@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_published_script_dry_run(path, tmp_path):
    """DRY_RUN=1 examples/run_slurm.sbatch ENTRY FLAGS (outside a job, SLURM_NTASKS = the
    script's ranks): the srun line on stdout and our verdict on stderr; --deepspeed left out."""
    entry, argv, world, refusal = load_script(path)
    argv = [a for a in argv if a != "--deepspeed"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DRY_RUN="1", SLURM_NTASKS=str(world), PYTHON=sys.executable,
               PATH=f"{tmp_path}{os.pathsep}{env['PATH']}")
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 99\n")  # must not run
    (tmp_path / "srun").chmod(0o755)
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "run_slurm.sbatch"), entry,
                           *argv], env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.stdout.startswith("srun --kill-on-bad-exit=1 ")
    if refusal:
        assert done.returncode == 1 and refusal in done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert f"DRY_RUN: flags valid for {world} processes" in done.stderr


def test_deepspeed_flags_map_to_native_options():
    base = gpt_argv("/nowhere/data")
    args = parse_args(base + ["--zero-stage", "1", "--no-pipeline-parallel"], world_size=2)
    assert args.use_distributed_optimizer and args.zero_stage == 1
    assert not parse_args(base + ["--zero-stage", "0"], world_size=1).use_distributed_optimizer
    for stage, what in ((2, "gradients"), (3, "gradients and parameters")):
        with pytest.raises(UserError, match=f"--zero-stage {stage}: ZeRO stage {stage} shards "
                                            f"{what}, which only DeepSpeed's engine"):
            parse_args(base + ["--zero-stage", str(stage)], world_size=1)
    with pytest.raises(UserError, match="--no-pipeline-parallel contradicts "
                                        "--pipeline-model-parallel-size 2"):
        parse_args(base + ["--no-pipeline-parallel", "--pipeline-model-parallel-size", "2"],
                   world_size=2)
    with pytest.raises(NotImplementedYet, match="--data-efficiency-curriculum-learning"):
        parse_args(base + ["--data-efficiency-curriculum-learning"], world_size=1)


def test_warnings_once_on_rank_0_only(capsys, monkeypatch):
    argv = gpt_argv("/nowhere/data") + ["--deepspeed-activation-checkpointing"]
    parse_args(argv, world_size=1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "warning: --deepspeed-activation-checkpointing has no effect without "
        "--checkpoint-activations")
    monkeypatch.setenv("RANK", "1")
    parse_args(argv, world_size=2)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("backend, ours", [("flash", "sdpa"), ("fused", "sdpa"),
                                           ("unfused", "core"), ("local", "core"),
                                           ("auto", "auto")])
def test_attention_backend_chooses_our_kernel(backend, ours):
    args = parse_args(gpt_argv("/nowhere/data", "--attention-backend", backend), world_size=1)
    args.padded_vocab_size = 128
    assert transformer_config_from_args(args).attention_backend == ours


def test_attention_backends_compute_the_same_attention():
    """The three kernel choices give the same forward and gradients (no dropout: the kernels
    draw different masks) for GPT's causal and BERT's padding attention."""
    from megatron.model.config import TransformerConfig
    from megatron.model.transformer import ParallelAttention
    from megatron.parallel.state import ParallelState

    results = {}
    for backend in ("auto", "sdpa", "core"):
        torch.manual_seed(0)
        cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                                seq_length=8, padded_vocab_size=64, attention_dropout=0.0,
                                hidden_dropout=0.0, attention_backend=backend, init_seed=1)
        attn = ParallelAttention(cfg, layer_number=0, parallel=ParallelState(), causal=True)
        x = torch.randn(2, 8, 32, requires_grad=True)
        out = attn(x)
        out.sum().backward()
        results[backend] = (out.detach(), x.grad.clone())
    for backend in ("sdpa", "core"):
        torch.testing.assert_close(results[backend][0], results["auto"][0])
        torch.testing.assert_close(results[backend][1], results["auto"][1])


@pytest.mark.slow
def test_checkpoint_args_carry_what_megatron_tools_read(data_prefix, tmp_path):
    """A checkpoint of ours has every args field in megatron_saved_args_fields.txt, with
    Megatron's meaning: the converters' GeLU choice is our MLP's, params_dtype a torch dtype."""
    from megatron.checkpoint_args import checkpoint_args
    from megatron.tokenizer import build_tokenizer, vocab_size_with_padding

    run(gpt_argv(data_prefix, "--save", str(tmp_path / "ckpt"), iters=2))
    saved = checkpoint_args(str(tmp_path / "ckpt"))
    fields = [line.split()[0] for line in
              open(os.path.join(ASSETS, "megatron_saved_args_fields.txt"), encoding="utf-8")
              if line.strip() and not line.startswith("#")]
    missing = [f for f in fields if not hasattr(saved, f)]
    assert not missing, f"checkpoint args lack {missing}"
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)
    assert saved.padded_vocab_size == vocab_size_with_padding(tokenizer.vocab_size, 64, 1)
    assert saved.params_dtype == torch.float32
    assert saved.add_bias_linear and not saved.disable_bias_linear
    assert saved.add_position_embedding and saved.normalization == "LayerNorm"
    assert saved.num_query_groups == saved.num_attention_heads and not saved.swiglu
    assert saved.tokenizer_type == "GPT2BPETokenizer" and saved.consumed_train_samples == 8
    # transformers' converter: bias_gelu_fusion -> tanh GeLU ("gelu_fast"), our MLP's default.
    config = transformer_config_from_args(saved)
    assert saved.bias_gelu_fusion and not saved.openai_gelu
    assert config.gelu_approximate == "tanh"
    assert saved.attention_softmax_in_fp32 and not saved.apply_query_key_layer_scaling


@pytest.mark.parametrize("flag", ["--use-flash-attn", "--use-flash-attn-v2"])
def test_use_flash_attn_is_the_flash_backend(flag):
    args = parse_args(gpt_argv("/nowhere/data", flag), world_size=1)
    args.padded_vocab_size = 128
    assert args.attention_backend == "flash" and args.use_flash_attn
    assert transformer_config_from_args(args).attention_backend == "sdpa"
    with pytest.raises(UserError, match="--use-flash-attn contradicts --attention-backend "
                                        "unfused"):
        parse_args(gpt_argv("/nowhere/data", flag, "--attention-backend", "unfused"),
                   world_size=1)
