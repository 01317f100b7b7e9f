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
                      "pretrain_gpt3_350M.sh", "pretrain_gpt3_1.3B.sh"]


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
    entry = next(i for i, a in enumerate(argv) if a.endswith("pretrain_gpt.py"))
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
