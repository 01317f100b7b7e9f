"""The launch scripts in examples/: shell syntax, the flags they build, and real short runs.

- every ``examples/*.sh`` / ``*.sbatch`` passes ``bash -n``;
- the GPT-3 350M / 1.3B scripts, with ``torchrun`` or ``srun`` replaced by a stub that records
  its arguments, build command lines that our own flag parser accepts for 64 ranks, with the
  random-LTD switch, the DeepSpeed-JSON variant, the layer-token budget and the recipe's
  per-budget learning rates; they share ``examples/gpt3_common.sh``, found from the repository
  root, so a copy of a script that sbatch runs from its spool directory builds the same command;
- the GPT-3 scripts stop with one line (exit 2) when the data or vocabulary is missing, and
  ``DRY_RUN=1`` prints the launch command and checks its flags for the launcher's world size
  (64 under SLURM) without starting anything;
- ``examples/pretrain_bert_large.sh`` builds the paper's BERT-large recipe (seq 512, global
  batch 1024, micro-batch 16, 2M iterations; RANDOM_LTD=0/1/2 = dense / random-LTD-1 / -2 presets,
  ABLATION=1 = the 0.2M-iteration ablations at lr 4e-4, DS_CONFIG = the shipped DeepSpeed JSON,
  which is random-LTD-2), accepted by our parser plus pretrain_bert.check_args for 64 ranks;
  ``DRY_RUN=1`` prints the layout and the kept-length schedule; a micro-batch that does not
  divide the global batch, missing data and document-level data are refused in one line;
- ``examples/pretrain_gpt_tiny_cpu.sh`` really trains 3 iterations with 2 gloo processes
  (torchrun, TP 2) on the test corpus and writes per-rank checkpoints;
- ``examples/run_slurm.sbatch`` really trains 2 iterations with 2 processes started by a stub
  ``srun`` that sets only SLURM's variables (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID /
  SLURM_JOB_NODELIST), as a cluster's srun does: no torchrun, no RANK/WORLD_SIZE.
"""

import glob
import os
import shutil
import stat
import subprocess
import sys

import pytest

from distributed_harness import free_port
from training_helpers import MERGES, ROOT, VOCAB, gpt_argv

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "examples", "*.sbatch")))
OWN_LAUNCH_SCRIPTS = ["pretrain_gpt_tiny_cpu.sh", "run_torchrun.sh", "run_slurm.sbatch",
                      "pretrain_gpt3_350M.sh", "pretrain_gpt3_1.3B.sh", "pretrain_bert_large.sh"]


def test_launch_scripts_exist():
    names = {os.path.basename(p) for p in SCRIPTS}
    missing = [n for n in OWN_LAUNCH_SCRIPTS if n not in names]
    assert not missing, f"missing launch scripts: {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shell_syntax(script):
    done = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _clean_env(**extra):
    """The environment of a fresh shell: no launcher variables from outside."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                      "MASTER_ADDR", "MASTER_PORT",
                                                      "GPUS_PER_NODE")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _stub(directory, name, body):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/bash\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


RECORD = 'printf "%s\\0" "$@" > "$RECORD_FILE"\n'


def _fake_pile(directory, *names, vocab=True):
    """Empty ``<name>.bin/.idx`` files (and GPT-2 vocab files) that the scripts' checks find."""
    os.makedirs(directory, exist_ok=True)
    files = [f"{n}.{ext}" for n in names for ext in ("bin", "idx")]
    files += ["gpt2-vocab.json", "gpt2-merges.txt"] if vocab else []
    for name in files:
        open(os.path.join(directory, name), "w").close()
    return [os.path.join(directory, n) for n in names]


def _run_script(tmp_path, script, launcher, **env):
    """Run ``script`` with ``torchrun`` / ``srun`` stubbed (they record their argv); the data
    defaults to an existing fake PILE prefix. -> (completed process, record file)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stub(str(bin_dir), "torchrun", RECORD)
    _stub(str(bin_dir), "srun", RECORD)
    record = tmp_path / "argv"
    if record.exists():
        record.unlink()
    extra = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD_FILE": record,
             "LAUNCHER": launcher}
    if "DATA_PATH" not in env:
        extra["DATA_PATH"] = _fake_pile(str(tmp_path / "pile-gpt2"), "pile_all")[0]
    if launcher == "slurm":
        extra.update(SLURM_JOB_ID=77, SLURM_NTASKS=64, SLURM_JOB_NUM_NODES=8,
                     SLURM_JOB_NODELIST="gpu[001-008]")
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", script)],
                          env=_clean_env(**extra, **env), capture_output=True, text=True,
                          timeout=60)
    return done, record


def _recorded_command(tmp_path, script, launcher, **env):
    """-> (launcher argv, entry, flags) of ``script`` run with the launcher stubbed."""
    done, record = _run_script(tmp_path, script, launcher, **env)
    assert done.returncode == 0, done.stderr
    argv = record.read_text().split("\0")[:-1]
    entry = next(i for i, a in enumerate(argv)
                 if a.endswith(("pretrain_gpt.py", "pretrain_bert.py")))
    return argv[:entry], argv[entry], argv[entry + 1:]


def _flag(flags, name):
    assert flags.count(name) == 1, f"{name} appears {flags.count(name)} times in {flags}"
    return flags[flags.index(name) + 1]


def _parse(flags):
    from megatron.arguments import parse_args

    return parse_args(flags, world_size=64)


@pytest.mark.parametrize("script,layers,hidden,gbs,ltd_steps,lr", [
    ("pretrain_gpt3_350M.sh", 24, 1024, 256, 400000, 3.0e-4),
    ("pretrain_gpt3_1.3B.sh", 24, 2048, 512, 200000, 2.0e-4),
])
def test_gpt3_scripts_build_valid_commands(tmp_path, script, layers, hidden, gbs, ltd_steps,
                                           lr):
    launch, entry, flags = _recorded_command(tmp_path, script, "torchrun")
    assert os.path.samefile(entry, os.path.join(ROOT, "pretrain_gpt.py"))
    assert "--nproc_per_node" in launch
    args = _parse(flags)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (layers, hidden, 16)
    assert (args.seq_length, args.global_batch_size) == (2048, gbs)
    assert args.data_parallel_size * args.tensor_model_parallel_size \
        * args.pipeline_model_parallel_size == 64
    assert args.train_tokens == 300 * 10**9 and args.lr == lr
    assert args.lr_warmup_tokens == 3 * 10**9 and args.lr_decay_tokens == 300 * 10**9
    assert (args.adam_beta2, args.weight_decay, args.clip_grad) == (0.95, 0.1, 1.0)
    assert args.random_ltd
    assert (_flag(flags, "--random-ltd-start"), _flag(flags, "--random-ltd-step"),
            _flag(flags, "--random-ltd-schedule-steps")) == ("128", "16", str(ltd_steps))
    assert _flag(flags, "--vocab-file").endswith("gpt2-vocab.json")

    # the dense baseline: the same run without the random-LTD flags
    _, _, dense = _recorded_command(tmp_path, script, "torchrun", RANDOM_LTD=0)
    assert not any(f.startswith("--random-ltd") for f in dense)
    assert not _parse(dense).random_ltd
    names = lambda fl: [f for f in fl if f.startswith("--")]  # noqa: E731
    assert names(dense) == [f for f in names(flags) if not f.startswith("--random-ltd")]

    # random-LTD from the shipped DeepSpeed JSON (checked against the flags by our parser)
    _, _, ds = _recorded_command(tmp_path, script, "torchrun", USE_DS_CONFIG=1)
    assert os.path.isfile(_flag(ds, "--deepspeed_config"))
    assert "--random-ltd-start" not in ds
    assert _parse(ds).random_ltd

    # equal-compute budget in layer tokens replaces the token budget
    _, _, budget = _recorded_command(tmp_path, script, "torchrun",
                                     TRAIN_LAYER_TOKENS=7200000000000)
    assert _flag(budget, "--train-layer-tokens") == "7200000000000"
    assert "--train-tokens" not in budget
    assert _parse(budget).train_layer_tokens == 7200000000000

    # data path variables, blends included
    a, b = _fake_pile(str(tmp_path / "pile"), "a_text_document", "b_text_document", vocab=False)
    _fake_pile(str(tmp_path / "v"))  # only the vocabulary files
    _, _, data = _recorded_command(tmp_path, script, "torchrun", DATA_PATH=f"0.3 {a} 0.7 {b}",
                                   VOCAB_FILE=str(tmp_path / "v" / "gpt2-vocab.json"),
                                   MERGE_FILE=str(tmp_path / "v" / "gpt2-merges.txt"))
    i = data.index("--data-path")
    assert data[i + 1:i + 5] == ["0.3", a, "0.7", b]
    assert _flag(data, "--vocab-file") == str(tmp_path / "v" / "gpt2-vocab.json")


def test_gpt3_1_3B_token_budgets_follow_the_recipe(tmp_path):
    _, _, flags = _recorded_command(tmp_path, "pretrain_gpt3_1.3B.sh", "torchrun",
                                    TRAIN_TOKENS_IN_BILLION=200)
    args = _parse(flags)
    assert args.train_tokens == 200 * 10**9 and args.lr == 3.0e-4
    assert _flag(flags, "--random-ltd-schedule-steps") == "133333"
    _, _, flags = _recorded_command(tmp_path, "pretrain_gpt3_1.3B.sh", "torchrun",
                                    TRAIN_TOKENS_IN_BILLION=150)
    assert _parse(flags).lr == 4.0e-4
    assert _flag(flags, "--random-ltd-schedule-steps") == "100000"


def test_gpt3_script_under_slurm_uses_plain_srun(tmp_path):
    launch, entry, flags = _recorded_command(tmp_path, "pretrain_gpt3_350M.sh", "slurm")
    assert "--kill-on-bad-exit=1" in launch
    assert os.path.basename(launch[-2]).startswith("python") and launch[-1] == "-u"
    assert entry.endswith("pretrain_gpt.py")
    assert _parse(flags).num_layers == 24


def test_gpt3_script_spooled_by_sbatch_finds_the_shared_file(tmp_path):
    """sbatch runs a copy of the script from its spool directory: the root, and with it
    examples/gpt3_common.sh, comes from SLURM_SUBMIT_DIR, and the command is the same."""
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    shutil.copy(os.path.join(ROOT, "examples", "pretrain_gpt3_1.3B.sh"), copy)
    expected = _recorded_command(tmp_path, "pretrain_gpt3_1.3B.sh", "slurm")
    assert _recorded_command(tmp_path, str(copy), "slurm", SLURM_SUBMIT_DIR=ROOT) == expected
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "gpt3_common.sh")],
                          env=_clean_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "pretrain_gpt3_" in done.stderr


@pytest.mark.parametrize("script", ["pretrain_gpt3_350M.sh", "pretrain_gpt3_1.3B.sh"])
def test_gpt3_script_without_data_stops_in_one_line(tmp_path, script):
    """The default DATA_PATH does not exist here: one line naming what is missing and the
    variables to set, exit 2, and no launcher started (not 64 ranks failing one by one)."""
    done, record = _run_script(tmp_path, script, "slurm",
                               DATA_PATH=str(tmp_path / "nowhere" / "pile_all"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "pile_all.idx" in lines[0] and "DATA_PATH" in lines[0] and "VOCAB_FILE" in lines[0]
    assert not record.exists()


def test_gpt3_script_single_data_prefix_may_contain_spaces(tmp_path):
    prefix = _fake_pile(str(tmp_path / "my data"), "pile_all")[0]
    _, _, flags = _recorded_command(tmp_path, "pretrain_gpt3_350M.sh", "torchrun",
                                    DATA_PATH=prefix)
    i = flags.index("--data-path")
    assert flags[i + 1] == prefix and flags[i + 2] == "--split"
    assert _flag(flags, "--vocab-file") == str(tmp_path / "my data" / "gpt2-vocab.json")


@pytest.mark.parametrize("script,hidden", [("pretrain_gpt3_350M.sh", 1024),
                                           ("pretrain_gpt3_1.3B.sh", 2048)])
@pytest.mark.slow
def test_gpt3_script_dry_run_checks_the_64_gpu_layout(tmp_path, script, hidden):
    """DRY_RUN=1 outside a job (a login node): the srun command line on stdout, our parser's
    verdict for the 64 tasks of the #SBATCH lines on stderr; nothing is started, and missing
    data is only a warning."""
    env = _clean_env(DRY_RUN=1, LAUNCHER="slurm", PYTHON=sys.executable,
                     DATA_PATH=str(tmp_path / "nowhere" / "pile_all"),
                     PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    _stub(str(tmp_path), "srun", "exit 99\n")  # must not run
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", script)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("srun --kill-on-bad-exit=1 ")
    assert f"--hidden-size {hidden} " in done.stdout
    assert "warning:" in done.stderr and "pile_all.idx" in done.stderr
    assert "flags valid for 64 processes: TP 1 x PP 1 x DP 64" in done.stderr

    env.update(TP="3")  # 16 heads and 64 GPUs are not divisible by 3
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", script)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "DRY_RUN: rejected for 64 processes" in done.stderr


@pytest.mark.slow
def test_torchrun_dry_run_counts_visible_gpus(tmp_path):
    env = _clean_env(DRY_RUN=1, CUDA_VISIBLE_DEVICES="2,3", PYTHON=sys.executable)
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
             "--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "1",
             "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-3", "--mock-data"]
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "run_torchrun.sh"),
                           "pretrain_gpt.py", *flags], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--nproc_per_node 2 " in done.stdout
    assert "flags valid for 2 processes: TP 1 x PP 1 x DP 2" in done.stderr


def test_slurm_script_master_address_and_cpus(tmp_path):
    """Inside a job: MASTER_ADDR is the first host as ``scontrol show hostnames`` lists it (forms
    such as "node[1-2]-ib" included), and sbatch's --cpus-per-task reaches srun's tasks."""
    _stub(str(tmp_path), "scontrol", 'printf "%s\\n" node1-ib node2-ib\n')
    _stub(str(tmp_path), "srun", 'echo "MASTER_ADDR=$MASTER_ADDR SRUN_CPUS=$SRUN_CPUS_PER_TASK"\n')
    env = _clean_env(PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=5,
                     SLURM_NTASKS=16, SLURM_JOB_NODELIST="node[1-2]-ib", SLURM_CPUS_PER_TASK=10)
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "run_slurm.sbatch"),
                           "pretrain_gpt.py"], env=env, capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "MASTER_ADDR=node1-ib SRUN_CPUS=10" in done.stdout


def test_slurm_script_refuses_to_run_outside_a_job():
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "run_slurm.sbatch")],
                          env=_clean_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "sbatch" in done.stderr


@pytest.mark.slow
def test_tiny_cpu_script_trains_with_two_processes(data_prefix, tmp_path):
    """examples/pretrain_gpt_tiny_cpu.sh under torchrun: 2 gloo processes, TP 2, random-LTD."""
    save = tmp_path / "ckpt"
    env = _clean_env(NPROC=2, TP=2, PP=1, DATA_PATH=data_prefix, VOCAB_FILE=VOCAB,
                     MERGE_FILE=MERGES, SAVE_DIR=save, MASTER_PORT=free_port(),
                     PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "pretrain_gpt_tiny_cpu.sh"),
         "--num-layers", "3", "--hidden-size", "64", "--seq-length", "64",
         "--max-position-embeddings", "64", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--random-ltd-start", "16", "--random-ltd-schedule-steps",
         "2", "--train-iters", "3", "--lr-warmup-iters", "1", "--log-interval", "1",
         "--eval-interval", "3",
         "--eval-iters", "1", "--save-interval", "3"],
        env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "(TP 2 x PP 1 x DP 1)" in out
    assert "iteration        3/       3" in out
    assert "random ltd reserved length:    16" in out  # dropping was on
    for rank_dir in ("mp_rank_00", "mp_rank_01"):
        assert (save / "iter_0000003" / rank_dir / "model_optim_rng.pt").is_file()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


SRUN_STUB = """\
# A stand-in for SLURM's srun on one machine: start SLURM_NTASKS copies of the command with the
# variables srun gives each task, and nothing else.
while [[ "${1:-}" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_ID=0 \
        SLURM_STEP_NUM_TASKS=$SLURM_NTASKS "$@" > "$TASK_LOG.$i" 2>&1 &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


@pytest.mark.slow
def test_slurm_script_trains_without_torchrun(data_prefix, tmp_path):
    """examples/run_slurm.sbatch: ranks and the master address come from SLURM's variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(str(bin_dir), "srun", SRUN_STUB)
    log = tmp_path / "task"
    env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TASK_LOG=log,
                     SLURM_JOB_ID=4242, SLURM_NTASKS=2, SLURM_JOB_NUM_NODES=1,
                     SLURM_JOB_NODELIST="localhost", MASTER_PORT=free_port(),
                     PYTHON=sys.executable)
    flags = gpt_argv(data_prefix, "--pipeline-model-parallel-size", "2",
                     "--distributed-backend", "gloo", "--eval-interval", "2", iters=2)
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "run_slurm.sbatch"),
                           "pretrain_gpt.py", *flags], env=env, capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    outputs = [(tmp_path / f"task.{i}").read_text() for i in range(2)
               if (tmp_path / f"task.{i}").exists()]
    assert done.returncode == 0, done.stderr + "\n".join(o[-3000:] for o in outputs)
    assert "job 4242" in done.stdout
    assert "(TP 1 x PP 2 x DP 1)" in outputs[0]
    assert "iteration        2/       2" in outputs[0]


# -- BERT-large (examples/pretrain_bert_large.sh) ----------------------------------------------

BERT_SCRIPT = "pretrain_bert_large.sh"
BERT_JSON = os.path.join(ROOT, "examples", "deepspeed_configs",
                         "ds_config_bert_large_random_ltd.json")


def _fake_bert_pile(directory, name="pile_bert_train_text_sentence"):
    """Empty sentence-level ``<name>.bin/.idx`` and a WordPiece vocabulary file next to them."""
    os.makedirs(directory, exist_ok=True)
    for f in (f"{name}.bin", f"{name}.idx", "bert-large-uncased-vocab.txt"):
        open(os.path.join(directory, f), "w").close()
    return os.path.join(directory, name)


def _bert_command(tmp_path, launcher="slurm", **env):
    env.setdefault("DATA_PATH", _fake_bert_pile(str(tmp_path / "pile-bert")))
    launch, entry, flags = _recorded_command(tmp_path, BERT_SCRIPT, launcher, **env)
    assert os.path.samefile(entry, os.path.join(ROOT, "pretrain_bert.py"))
    return launch, flags


def _parse_bert(flags, world=64):
    """What every rank does at start-up: Megatron's parser, then pretrain_bert's own checks."""
    from megatron.arguments import parse_args
    import pretrain_bert

    args = parse_args(flags, world_size=world)
    pretrain_bert.check_args(args)
    return args


def _kept(args):
    from megatron.ltd.config import random_ltd_config_from_args

    cfg = random_ltd_config_from_args(args)
    return None if cfg is None or not cfg.enabled else (cfg.start, cfg.step, cfg.schedule,
                                                        cfg.schedule_steps, cfg.layer_ids)


@pytest.mark.parametrize("env,iters,lr,preset", [
    ({"RANDOM_LTD": "0"}, 2000000, 1.0e-4, None),
    ({}, 2000000, 1.0e-4, "bert-ltd-1"),                       # RANDOM_LTD=1 is the default
    ({"RANDOM_LTD": "1"}, 2000000, 1.0e-4, "bert-ltd-1"),
    ({"RANDOM_LTD": "2"}, 2000000, 1.0e-4, "bert-ltd-2"),
    ({"ABLATION": "1", "RANDOM_LTD": "0"}, 200000, 4.0e-4, None),
    ({"ABLATION": "1", "RANDOM_LTD": "1"}, 200000, 4.0e-4, "bert-ablation-3.8b"),
    ({"ABLATION": "1", "RANDOM_LTD": "2"}, 200000, 4.0e-4, "bert-ablation-6b"),
    ({"ABLATION": "1", "LTD_PRESET": "bert-ablation-6b"}, 200000, 4.0e-4, "bert-ablation-6b"),
    ({"ITERS": "20000", "RANDOM_LTD": "2"}, 20000, 1.0e-4, "bert-ltd-2"),
], ids=["dense", "default", "ltd1", "ltd2", "ablation-dense", "ablation-ltd1", "ablation-ltd2",
        "ablation-preset-var", "short-run"])
def test_bert_large_script_builds_the_papers_recipe(tmp_path, env, iters, lr, preset):
    """Under srun in a 64-task job: the paper's BERT-large recipe, the RANDOM_LTD / ABLATION
    preset, and flags that our parser and pretrain_bert.check_args accept for 64 ranks."""
    launch, flags = _bert_command(tmp_path, "slurm", **env)
    assert "--kill-on-bad-exit=1" in launch
    a = _parse_bert(flags)
    assert (a.num_layers, a.hidden_size, a.num_attention_heads) == (24, 1024, 16)
    assert (a.seq_length, a.max_position_embeddings) == (512, 512)
    assert (a.global_batch_size, a.micro_batch_size) == (1024, 16)
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
            a.data_parallel_size, a.num_micro_batches) == (1, 1, 64, 1)
    assert a.train_iters == iters and a.lr == lr and a.min_lr == 1.0e-5
    assert (a.lr_decay_style, a.lr_warmup_iters, a.lr_decay_iters) == ("linear", 10000, iters)
    assert (a.adam_beta1, a.adam_beta2, a.weight_decay, a.clip_grad) == (0.9, 0.999, 0.01, 1.0)
    assert a.init_method_std == 0.02 and a.fp16 and not a.bf16
    assert _flag(flags, "--split") == "949,50,1"
    assert _flag(flags, "--tokenizer-type") == "BertWordPieceLowerCase"
    assert _flag(flags, "--vocab-file").endswith("bert-large-uncased-vocab.txt")
    assert _flag(flags, "--data-path").endswith("_text_sentence")
    assert a.bert_binary_head  # Megatron's SOP head, as the recipe
    if preset is None:
        assert not any(f.startswith("--random-ltd") for f in flags) and not a.random_ltd
        assert _kept(a) is None
    else:
        assert _flag(flags, "--random-ltd-preset") == preset
        assert "--deepspeed-config" not in flags and a.random_ltd
        from megatron.ltd.config import PRESETS

        steps = max(1, round(PRESETS[preset].ramp_fraction * iters))
        start = PRESETS[preset].start
        assert _kept(a) == (start, 16, "fixed_linear", steps, tuple(range(1, 23)))


def test_bert_large_presets_reproduce_the_papers_savings():
    """The four presets at their paper run lengths give Tab. 2 / the ablations' layer-token
    savings (26.2%, 31.1%, 14.1%, 22.3%), which pins the schedules the script passes."""
    from megatron.ltd.config import PRESETS
    from megatron.ltd.schedule import KeptLengthSchedule
    import numpy as np

    for name, iters, saving in (("bert-ltd-1", 2000000, 26.2), ("bert-ltd-2", 2000000, 31.1),
                                ("bert-ablation-3.8b", 200000, 14.1),
                                ("bert-ablation-6b", 200000, 22.3)):
        steps = max(1, round(PRESETS[name].ramp_fraction * iters))
        kept = KeptLengthSchedule("fixed_linear", PRESETS[name].start, 512, 16,
                                  require_steps=steps).values(np.arange(iters))
        got = 100 * (1 - (2 * 512 + 22 * kept).sum() / (24 * 512 * iters))
        assert round(got, 1) == saving, name


def test_bert_large_ds_json_is_megatron_deepspeeds(tmp_path):
    """DS_CONFIG=<the shipped JSON>: random-LTD from its section instead of a preset. The JSON
    is Megatron-DeepSpeed's BERT-large data-efficiency recipe as its scripts write it (start
    128, +16, require_steps = ltd_step_in_million 2 x 1e6 = 2,000,000: a 35.8% layer-token
    saving), not the paper's random-LTD-2 (+16 per 38B tokens, 31.1%), which is the preset
    RANDOM_LTD=2: users who bring their JSON get their schedule."""
    import json

    _, flags = _bert_command(tmp_path, DS_CONFIG=BERT_JSON)
    assert os.path.samefile(_flag(flags, "--deepspeed-config"), BERT_JSON)
    assert "--random-ltd-preset" not in flags and "--random-ltd" in flags
    start, step, schedule, steps, layers = _kept(_parse_bert(flags))
    assert (start, step, schedule, steps) == (128, 16, "fixed_linear", 2_000_000)
    assert list(layers) == list(range(1, 23))
    with open(BERT_JSON) as f:
        ds = json.load(f)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (1024, 16)
    assert ds["gradient_clipping"] == 1.0 and ds["fp16"]["enabled"]
    section = ds["data_efficiency"]["data_routing"]["random_ltd"]
    assert section["model_type"] == "encoder" and section["total_layer_num"] == 24
    # a relative path is found from the repository root too (sbatch from elsewhere)
    rel = os.path.relpath(BERT_JSON, ROOT)
    _, flags = _bert_command(tmp_path, DS_CONFIG=rel)
    assert os.path.samefile(_flag(flags, "--deepspeed-config"), BERT_JSON)


def test_bert_large_script_overrides(tmp_path):
    """TP/PP, bf16, the iteration count, checkpoint path and torchrun on one node."""
    _, flags = _bert_command(tmp_path, TP=2, PP=2, MICRO_BATCH=8, PRECISION="bf16",
                             CHECKPOINT_PATH=str(tmp_path / "ckpt"), ITERS=1000,
                             WARMUP_ITERS=100)
    a = _parse_bert(flags)
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
            a.data_parallel_size, a.num_micro_batches) == (2, 2, 16, 8)
    assert a.bf16 and not a.fp16 and a.train_iters == 1000 and a.lr_warmup_iters == 100
    assert _flag(flags, "--save") == _flag(flags, "--load") == str(tmp_path / "ckpt")
    launch, flags = _bert_command(tmp_path, "torchrun", GPUS_PER_NODE=8)
    assert launch[launch.index("--nproc_per_node") + 1] == "8"
    assert _parse_bert(flags, world=8).num_micro_batches == 8
    # extra arguments pass through after the script's own flags (so they win)
    done, record = _bert_run(tmp_path, ["--eval-interval", "2000", "--bert-no-binary-head"])
    assert done.returncode == 0, done.stderr
    flags = record.read_text().split("\0")[:-1]
    assert flags[-3:] == ["--eval-interval", "2000", "--bert-no-binary-head"]
    a = _parse_bert(flags[flags.index(os.path.join(ROOT, "pretrain_bert.py")) + 1:])
    assert a.eval_interval == 2000 and not a.bert_binary_head


def _bert_run(tmp_path, args=(), **env):
    """Run the script under SLURM (64 tasks) with srun stubbed -> (process, record file)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stub(str(bin_dir), "srun", RECORD)
    record = tmp_path / "argv"
    env.setdefault("DATA_PATH", _fake_bert_pile(str(tmp_path / "pile-bert")))
    extra = dict(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RECORD_FILE=record,
                 LAUNCHER="slurm", PYTHON=sys.executable, SLURM_JOB_ID=77, SLURM_NTASKS=64,
                 SLURM_JOB_NUM_NODES=8, SLURM_JOB_NODELIST="gpu[001-008]")
    extra.update(env)
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", BERT_SCRIPT), *args],
                          env=_clean_env(**extra), capture_output=True, text=True, timeout=120)
    return done, record


@pytest.mark.parametrize("env,bad", [
    ({"MICRO_BATCH": "24"}, "not divisible by MICRO_BATCH 24 x DP 64"),
    ({"MICRO_BATCH": "32"}, "not divisible by MICRO_BATCH 32 x DP 64"),
    ({"TP": "3"}, "64 GPUs are not divisible by TP 3 x PP 1"),
    ({"RANDOM_LTD": "3"}, "RANDOM_LTD must be 0, 1 or 2"),
    ({"RANDOM_LTD": "0", "LTD_PRESET": "bert-ltd-2"}, "LTD_PRESET=bert-ltd-2 with RANDOM_LTD=0"),
    ({"LTD_PRESET": "gpt-ltd"}, "LTD_PRESET must be"),
    ({"DS_CONFIG": BERT_JSON, "RANDOM_LTD": "0"}, "leave out RANDOM_LTD=0"),
    ({"DS_CONFIG": "/nowhere/ds.json"}, "DS_CONFIG /nowhere/ds.json: no such file"),
    ({"ABLATION": "2"}, "ABLATION must be 0 or 1"),
    ({"PRECISION": "fp8"}, "PRECISION must be fp16 or bf16"),
], ids=["mbs24", "mbs32", "tp3", "ltd3", "dense-preset", "bad-preset", "ds-dense", "ds-missing",
        "ablation2", "fp8"])
def test_bert_large_script_refuses_bad_combinations_in_one_line(tmp_path, env, bad):
    """Refused before srun starts 64 ranks: one line naming the variables, exit 2."""
    done, record = _bert_run(tmp_path, **env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain_bert_large.sh: "), done.stderr
    assert bad in lines[0], lines[0]
    assert not record.exists()


def test_bert_large_script_without_data_stops_in_one_line(tmp_path):
    done, record = _bert_run(tmp_path, DATA_PATH=str(tmp_path / "nowhere" / "pile_bert"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "pile_bert.idx" in lines[0] and "bert-large-uncased-vocab.txt" in lines[0]
    assert "DATA_PATH" in lines[0] and "VOCAB_FILE" in lines[0] and "--split-sentences" in lines[0]
    assert not record.exists()
    # a GPT-style document-level prefix has no sentences: refused, naming the fix
    prefix = _fake_bert_pile(str(tmp_path / "doc"), "pile_text_document")
    done, record = _bert_run(tmp_path, DATA_PATH=prefix)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "--split-sentences" in lines[0]
    assert not record.exists()


def _bert_dry_run(tmp_path, **env):
    """DRY_RUN=1 on a login node (no job): 64 tasks from the #SBATCH lines; srun must not run."""
    _stub(str(tmp_path), "srun", "exit 99\n")
    env.setdefault("DATA_PATH", _fake_bert_pile(str(tmp_path / "pile-bert")))
    run_env = _clean_env(DRY_RUN=1, LAUNCHER="slurm", PYTHON=sys.executable,
                         PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", **env)
    return subprocess.run(["bash", os.path.join(ROOT, "examples", BERT_SCRIPT)], env=run_env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("env,preset,schedule", [
    ({"RANDOM_LTD": "0"}, None, None),
    ({"RANDOM_LTD": "1"}, "bert-ltd-1", "kept length (preset bert-ltd-1): 192 (start 200 rounded "
     "down to a multiple of 16) -> 512 in layers 1-22 of 24, +16 every 91,553 iterations (48.0B "
     "tokens), full length from iteration 1,785,278 of 2,000,000; layer-token saving 26.2%"),
    ({"RANDOM_LTD": "2"}, "bert-ltd-2", "kept length (preset bert-ltd-2): 128 -> 512 in layers "
     "1-22 of 24, +16 every 72,479 iterations (38.0B tokens), full length from iteration "
     "1,739,502 of 2,000,000; layer-token saving 31.1%"),
    ({"ABLATION": "1", "RANDOM_LTD": "2"}, "bert-ablation-6b", "kept length (preset "
     "bert-ablation-6b): 256 -> 512 in layers 1-22 of 24, +16 every 11,444 iterations (6.0B "
     "tokens), full length from iteration 183,105 of 200,000; layer-token saving 22.3%"),
], ids=["dense", "ltd1", "ltd2", "ablation"])
@pytest.mark.slow
def test_bert_large_dry_run_checks_the_64_gpu_layout(tmp_path, env, preset, schedule):
    """DRY_RUN=1: the srun command on stdout; on stderr our parser's and pretrain_bert's verdict
    for 64 tasks (TP x PP x DP, micro-batches) and the kept-length schedule."""
    done = _bert_dry_run(tmp_path, **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("srun --kill-on-bad-exit=1 ")
    assert "pretrain_bert.py " in done.stdout
    for flag in ("--seq-length 512 ", "--global-batch-size 1024 ", "--micro-batch-size 16 "):
        assert flag in done.stdout
    assert ("--random-ltd-preset " + preset in done.stdout) if preset else \
        "--random-ltd" not in done.stdout
    assert ("--train-iters 200000 " if env.get("ABLATION") else "--train-iters 2000000 ") \
        in done.stdout
    assert ("flags valid for 64 processes: TP 1 x PP 1 x DP 64; micro-batch 16 x 1 "
            "micro-batches x DP 64 = global batch 1024; 24 layers, hidden 1024, seq 512; "
            + ("random-LTD" if preset else "dense") + " (pretrain_bert.py)") in done.stderr
    if schedule:
        assert "DRY_RUN: " + schedule in done.stderr
    else:
        assert "kept length" not in done.stderr


@pytest.mark.slow
def test_bert_large_dry_run_rejects_in_one_line(tmp_path):
    """A micro-batch that does not divide: the parser's one line, exit 1."""
    done = _bert_dry_run(tmp_path, MICRO_BATCH=24)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "DRY_RUN: rejected for 64 processes: --global-batch-size 1024 is not divisible by "
        "--micro-batch-size 24 x data-parallel size 64"]


@pytest.mark.slow
def test_bert_large_dry_run_ds_json_without_data(tmp_path):
    """The DS JSON variant on another layout (its batch sizes: micro 16, global 1024); missing
    data is only a warning in a dry run."""
    done = _bert_dry_run(tmp_path, DS_CONFIG=BERT_JSON, TP=2, MICRO_BATCH=16,
                         DATA_PATH=str(tmp_path / "nowhere" / "pile_bert"))
    assert done.returncode == 0, done.stderr
    assert "warning:" in done.stderr and "pile_bert.idx" in done.stderr
    assert "TP 2 x PP 1 x DP 32; micro-batch 16 x 2" in done.stderr  # the JSON's micro-batch
    assert ("kept length (DeepSpeed JSON ds_config_bert_large_random_ltd.json): 128 -> 512"
            in done.stderr and "saving 35.8%" in done.stderr)


def test_bert_large_script_spooled_by_sbatch_finds_the_root(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    shutil.copy(os.path.join(ROOT, "examples", BERT_SCRIPT), copy)
    data = _fake_bert_pile(str(tmp_path / "pile-bert"))
    expected = _recorded_command(tmp_path, BERT_SCRIPT, "slurm", DATA_PATH=data)
    assert _recorded_command(tmp_path, str(copy), "slurm", DATA_PATH=data,
                             SLURM_SUBMIT_DIR=ROOT) == expected


# -- finetuning launchers (examples/finetune_{mnli,qqp,race}.sh) ------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("script,task,gbs,mbs", [("finetune_mnli.sh", "MNLI", 128, 8),
                                                 ("finetune_qqp.sh", "QQP", 128, 8),
                                                 ("finetune_race.sh", "RACE", 32, 4)])
def test_finetune_script_dry_run_checks_every_seed(tmp_path, script, task, gbs, mbs):
    """DRY_RUN=1 outside a job: one srun command per seed (1234-1238) with the task's preset,
    each checked by tasks/main.py's parser for the 8 tasks of the #SBATCH lines; srun never
    runs and the missing data and checkpoints are warnings."""
    _stub(str(tmp_path), "srun", "exit 99\n")
    env = _clean_env(DRY_RUN=1, LAUNCHER="slurm", PYTHON=sys.executable,
                     CHECKPOINTS="baseline=/nowhere/bert", DATA_ROOT=str(tmp_path / "data"),
                     PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", script)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    commands = done.stdout.strip().splitlines()
    assert len(commands) == 5 and all(c.startswith("srun --kill-on-bad-exit=1 ") for c in commands)
    assert [c.split("--seed ")[1].split()[0] for c in commands] == [str(s) for s in
                                                                     range(1234, 1239)]
    assert all(f"tasks/main.py --exit-signal-handler --exit-signal SIGUSR1 --task {task} " in c
               and f"--global-batch-size {gbs} " in c
               and "--pretrained-checkpoint /nowhere/bert " in c for c in commands)
    assert done.stderr.count(f"flags valid for 8 processes: TP 1 x PP 1 x DP 8; micro-batch "
                             f"{mbs} x {gbs // (8 * mbs)} micro-batches") == 5
    assert "warning:" in done.stderr and "/nowhere/bert" in done.stderr
    # preemptible under SLURM: each run saves to its own directory and resumes from it, and
    # run_slurm.sbatch adds the handler for the SIGUSR1 the runner passes on
    for seed, c in zip(range(1234, 1239), commands):
        ckpt = f"/baseline/{task}/seed{seed}/checkpoints"
        assert f"--save {ROOT}/finetune-runs{ckpt} --load {ROOT}/finetune-runs{ckpt} " in c
    header = open(os.path.join(ROOT, "examples", script)).read()
    assert "#SBATCH --signal=B:USR1@300" in header and "#SBATCH --requeue" in header


@pytest.mark.parametrize("env,bad", [
    ({"TP": "3"}, "8 GPUs are not divisible by TP 3 x PP 1"),
    ({"LAUNCHER": "torchrun", "GPUS_PER_NODE": "3"}, "global batch 128 is not divisible by DP 3"),
    ({"CHECKPOINTS": ""}, "set CHECKPOINTS"),
    ({"MODEL": "huge"}, "MODEL must be bert-large or checkpoint"),
    ({"PREEMPTIBLE": "yes"}, "PREEMPTIBLE must be 0 or 1"),
])
def test_finetune_script_refuses_in_one_line(tmp_path, env, bad):
    run_env = _clean_env(**{"LAUNCHER": "slurm", "PYTHON": sys.executable,
                            "CHECKPOINTS": "a=/nowhere", **env})
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "finetune_mnli.sh")],
                          env=run_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetune_mnli.sh: ") and bad in lines[0]
