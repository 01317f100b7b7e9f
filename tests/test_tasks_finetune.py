"""Finetuning end to end on the fixtures (tests/assets/tasks) through tasks/main.py: Megatron's
epoch and accuracy lines, correct/total equal to a hand count over the whole dev set (also with
DP2 and odd set sizes), TP2/PP2 equal to one process, bitwise resume in the middle of an epoch,
--epochs 0 (evaluation only), --keep-last, seeds, the --pretrained-checkpoint load of a BERT
pretraining checkpoint (its heads ignored, the task head initialised) and bad input.

Layout comparisons run with dropout 0 and SGD, as tests/test_bert_training.py explains.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from distributed_harness import run_distributed
from megatron.errors import UserError
from training_helpers import BERT_VOCAB, ROOT, VOCAB, MERGES

TASKS = os.path.join(ROOT, "tests", "assets", "tasks")
DATA = {
    "MNLI": (["MNLI/train.tsv"], ["MNLI/dev_matched.tsv", "MNLI/dev_mismatched.tsv"]),
    "QQP": (["QQP/train.tsv"], ["QQP/dev.tsv"]),
    "RACE": (["RACE/train"], ["RACE/dev"]),
}
MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "64", "--max-position-embeddings", "64",
         "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", BERT_VOCAB,
         "--make-vocab-size-divisible-by", "64"]
METRIC = re.compile(r"^ > \|epoch: (-?\d+)\| metrics for (\S+): correct / total = (\d+) / (\d+) "
                    r"= (\d+\.\d{4}) %, elapsed time \(sec\): \d+\.\d{3}$")
OVERALL = re.compile(r"^ >> \|epoch: (-?\d+)\| overall: correct / total = (\d+) / (\d+) = "
                     r"(\d+\.\d{4}) %$")


def task_argv(task, *extra, epochs=2, gbs=8, mbs=2, dropout="0", seed=7):
    train, valid = DATA[task]
    return ["--task", task, "--train-data", *[os.path.join(TASKS, p) for p in train],
            "--valid-data", *[os.path.join(TASKS, p) for p in valid], "--epochs", str(epochs),
            *MODEL, "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs),
            "--lr", "1e-3", "--lr-warmup-fraction", "0.065", "--lr-decay-style", "linear",
            "--hidden-dropout", dropout, "--attention-dropout", dropout,
            "--log-interval", "1", "--num-workers", "0", "--device", "cpu", "--seed", str(seed),
            *extra]


def run_task(argv):
    from tasks.main import main

    logs = []
    return main(argv, log=logs.append), logs


def metric_lines(logs):
    """[(epoch, name, correct, total)] and [(epoch, correct, total)] from Megatron's lines."""
    sets = [(int(m[1]), m[2], int(m[3]), int(m[4])) for m in map(METRIC.match, logs) if m]
    overall = [(int(m[1]), int(m[2]), int(m[3])) for m in map(OVERALL.match, logs) if m]
    return sets, overall


def losses(result):
    return [d["lm loss"] for _, d in result.run.train_losses]


def counts(result):
    return [(m.epoch, {n: (c.correct, c.total) for n, c in m.sets.items()})
            for m in result.metrics]


def hand_count(task, model_state, argv_extra=()):
    """correct / total per dev set, counted sample by sample with a single-process model that
    holds ``model_state`` (no loop, no loader): the reference for the printed lines."""
    from megatron.arguments import transformer_config_from_args
    from megatron.model.classification import Classification
    from megatron.model.multiple_choice import MultipleChoice
    from megatron.training import build_tokenizer_from_args
    from tasks.glue.finetune import glue_task_spec
    from tasks.main import parse_task_args
    from tasks.race.finetune import race_task_spec

    args = parse_task_args(task_argv(task, *argv_extra))
    tokenizer = build_tokenizer_from_args(args, log=lambda *a: None)
    config = transformer_config_from_args(args, num_tokentypes=2)
    spec = race_task_spec() if task == "RACE" else glue_task_spec(task)
    model = MultipleChoice(config) if task == "RACE" else Classification(
        config, **spec.model_kwargs)
    model.load_state_dict(model_state)
    model.eval()
    found = {}
    for path in args.valid_data:
        for ds in spec.eval_datasets(args, tokenizer, path, lambda *a: None):
            correct = 0
            for i in range(len(ds)):
                item = ds[i]
                as_batch = {k: torch.as_tensor(item[k]).unsqueeze(0)
                            for k in ("text", "types", "padding_mask")}
                with torch.no_grad():
                    logits = model(as_batch["text"], as_batch["padding_mask"],
                                   as_batch["types"])
                correct += int(logits.argmax(-1).item() == item["label"])
            found[ds.dataset_name] = (correct, len(ds))
    return found


# -- single process ----------------------------------------------------------------------------

@pytest.mark.slow
def test_mnli_prints_megatrons_lines_and_counts_every_dev_sample():
    result, logs = run_task(task_argv("MNLI"))
    assert [line for line in logs if line.startswith("working on epoch")] == \
        ["working on epoch 1 ...", "working on epoch 2 ..."]
    assert "37 training samples: 4 iterations per epoch of 8" in "\n".join(logs)
    assert [i for i, _ in result.run.train_losses] == list(range(1, 9))
    sets, overall = metric_lines(logs)
    assert [(e, n, t) for e, n, _, t in sets] == [(0, "dev-matched", 13), (0, "dev-mismatched", 11),
                                                  (1, "dev-matched", 13),
                                                  (1, "dev-mismatched", 11)]
    assert [(e, t) for e, _, t in overall] == [(0, 24), (1, 24)]
    assert counts(result) == [(e, {n: (c, t) for e2, n, c, t in sets if e2 == e})
                              for e in (0, 1)]
    for e, c, t in overall:
        assert c == sum(c2 for e2, _, c2, _ in sets if e2 == e)
    final = {n: (c, t) for e, n, c, t in sets if e == 1}
    assert final == hand_count("MNLI", result.run.model.state_dict())
    # the 'lm loss' line of Megatron's finetune
    assert any(" lm loss: " in line for line in logs if line.startswith(" iteration"))


@pytest.mark.slow
def test_race_reports_middle_high_and_overall_and_qqp_f1():
    result, logs = run_task(task_argv("RACE", epochs=1, gbs=4))
    sets, overall = metric_lines(logs)
    assert [(n, t) for _, n, _, t in sets] == [("dev-middle", 7), ("dev-high", 3)]
    assert overall[0][2] == 10
    assert {n: (c, t) for _, n, c, t in sets} == hand_count("RACE",
                                                            result.run.model.state_dict())
    result, logs = run_task(task_argv("QQP", epochs=1))
    f1 = [line for line in logs if "f1" in line]
    m = re.match(r"^ > \|epoch: 0\| f1 for dev: tp / fp / fn = (\d+) / (\d+) / (\d+), "
                 r"f1 = (\d+\.\d{4}) %$", f1[0])
    assert m, f1
    tp, fp, fn = map(int, m.groups()[:3])
    assert tp + fn == 6  # positives in QQP/dev.tsv
    expected = 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    assert f1[1] == f" >> |epoch: 0| overall: f1 = {expected:.4f} %"


def test_evaluation_only_mode():
    result, logs = run_task(task_argv("MNLI", epochs=0))
    assert "evaluation only mode, setting epoch to -1" in logs
    sets, overall = metric_lines(logs)
    assert [(e, n, t) for e, n, _, t in sets] == [(-1, "dev-matched", 13),
                                                  (-1, "dev-mismatched", 11)]
    assert overall[0][0] == -1 and overall[0][2] == 24
    assert result.run.train_losses == [] and result.run.state.iteration == 0
    assert {n: (c, t) for _, n, c, t in sets} == hand_count("MNLI", result.run.model.state_dict())


@pytest.mark.slow
def test_keep_last_and_seeds_change_the_run():
    base, logs = run_task(task_argv("QQP", "--keep-last", epochs=1))
    assert "31 training samples: 4 iterations per epoch of 8 (last batch kept)" in \
        "\n".join(logs)
    assert len(base.run.train_losses) == 4
    other, _ = run_task(task_argv("QQP", "--keep-last", epochs=1, seed=8))
    assert losses(other) != losses(base)


# -- parallel layouts -------------------------------------------------------------------------

def _finetune(rank, world_size, argv):
    result, logs = run_task(argv)
    # numpy, not tensors: tensors cross the result queue as shared memory of an ended process
    state = {k: v.numpy().copy() for k, v in result.run.model.state_dict().items()}
    return losses(result), counts(result), state, metric_lines(logs)


@pytest.mark.slow
def test_dp2_counts_every_sample_once_with_odd_sizes():
    """DP2 with eval micro-batch 2: 13 and 11 dev samples do not divide into 2 x 2; the summed
    counts equal a hand count of the whole sets (rank 0's final weights)."""
    argv = task_argv("MNLI", "--eval-micro-batch-size", "2", "--optimizer", "sgd")
    results = run_distributed(_finetune, 2, args=(argv,), timeout=300)
    (_, got, state, (sets, _)), (_, got1, _, _) = results
    assert got == got1
    final = {n: (c, t) for e, n, c, t in sets if e == 1}
    state = {k: torch.from_numpy(v) for k, v in state.items()}
    assert final == got[-1][1] == hand_count("MNLI", state)
    single, _ = run_task(argv)
    assert counts(single) == got


LAYOUTS = {
    "TP2": ["--tensor-model-parallel-size", "2"],
    "PP2": ["--pipeline-model-parallel-size", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["MNLI", "RACE"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(task, layout):
    argv = task_argv(task, "--optimizer", "sgd", "--lr", "0.05", epochs=2, gbs=4)
    single, _ = run_task(argv)
    results = run_distributed(_finetune, 2, args=(argv + LAYOUTS[layout],), timeout=300)
    for got_losses, got_counts, _, _ in results:
        assert len(got_losses) == len(losses(single))
        for a, b in zip(got_losses, losses(single)):
            assert abs(a - b) <= 2e-6 * abs(b), (got_losses, losses(single))
        assert got_counts == counts(single)


# -- resume -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_in_the_middle_of_an_epoch_is_bitwise(tmp_path):
    """2 epochs of 4 iterations (dropout on, Adam): stop at iteration 3 with --save, resume with
    --load: the same losses, metrics and final weights, bit for bit; a checkpoint is saved at
    the end of every epoch."""
    argv = task_argv("MNLI", dropout="0.1")
    full, _ = run_task(argv)
    ckpt = str(tmp_path / "ckpt")
    first, _ = run_task(argv + ["--save", ckpt, "--exit-interval", "3"])
    assert [i for i, _ in first.run.train_losses] == [1, 2, 3] and first.metrics == []
    second, logs = run_task(argv + ["--save", ckpt, "--load", ckpt])
    assert [i for i, _ in second.run.train_losses] == list(range(4, 9))
    assert losses(first) + losses(second) == losses(full)
    assert counts(second) == counts(full)
    for (name, a), b in zip(full.run.model.named_parameters(), second.run.model.parameters()):
        assert torch.equal(a, b), name
    assert sorted(os.listdir(ckpt)) == ["iter_0000003", "iter_0000004", "iter_0000008",
                                        "latest_checkpointed_iteration.txt"]
    # resuming a finished run trains nothing and fails nothing
    done, _ = run_task(argv + ["--load", ckpt])
    assert done.run.train_losses == [] and done.metrics == []


# -- the pretrained checkpoint -------------------------------------------------------------------

def _pretrain_bert(root, *extra):
    import pretrain_bert

    argv = [*MODEL, "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
            "--lr", "1e-3", "--mock-data", "--num-workers", "0", "--device", "cpu",
            "--eval-iters", "0", "--save", root, *extra]
    pretrain_bert.pretrain(pretrain_bert.PROVIDER, argv=argv, log=lambda *a: None)
    return root


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    return _pretrain_bert(str(tmp_path_factory.mktemp("bert")))


@pytest.mark.slow
def test_pretrained_bert_weights_load_with_heads_ignored(bert_checkpoint):
    from megatron.checkpointing import checkpoint_file, flat_model_state

    result, logs = run_task(task_argv("MNLI", "--pretrained-checkpoint", bert_checkpoint,
                                      epochs=0))
    saved = flat_model_state(torch.load(checkpoint_file(bert_checkpoint, 1),
                                        weights_only=False)["model"])
    model = result.run.model.state_dict()
    for name, value in saved.items():
        if name.startswith("language_model."):
            assert torch.equal(model[name], value), name
    head_lines = [line for line in logs if "lm_head" in line]
    assert len(head_lines) == 1, logs
    assert "binary_head" in head_lines[0] and "classification_head" in head_lines[0]
    # RACE: the same weights, the multiple-choice head initialised
    _, logs = run_task(task_argv("RACE", "--pretrained-checkpoint", bert_checkpoint, epochs=0))
    assert any("lm_head" in line and "multichoice_head" in line for line in logs)


def _pretrain_gpt(root, tokenizer_flags):
    import pretrain_gpt

    pretrain_gpt.pretrain(pretrain_gpt.datasets_provider, pretrain_gpt.model_provider,
                          pretrain_gpt.forward_step_provider,
                          argv=[*MODEL[:8], *tokenizer_flags, "--micro-batch-size", "2",
                                "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3",
                                "--mock-data", "--num-workers", "0", "--device", "cpu",
                                "--eval-iters", "0", "--save", root], log=lambda *a: None)
    return root


@pytest.mark.slow
def test_pretrained_checkpoint_mismatches_are_one_line(tmp_path):
    from megatron.checkpointing import checkpoint_file

    same_vocab = _pretrain_gpt(str(tmp_path / "gpt-bert-vocab"), MODEL[8:])
    gpt2_vocab = _pretrain_gpt(str(tmp_path / "gpt2"), ["--tokenizer-type", "GPT2BPETokenizer",
                                                        "--vocab-file", VOCAB,
                                                        "--merge-file", MERGES])
    broken = _pretrain_bert(str(tmp_path / "broken"))
    with open(checkpoint_file(broken, 1), "wb") as f:
        f.write(b"not a checkpoint")
    for root, message in ((same_vocab, "language_model.pooler.dense"),  # a GPT: no pooler
                          (gpt2_vocab, "padded vocabulary"),  # another vocabulary
                          (broken, "broken")):
        with pytest.raises(UserError) as err:
            run_task(task_argv("MNLI", "--pretrained-checkpoint", root, epochs=0))
        assert "\n" not in str(err.value) and message in str(err.value), str(err.value)


# -- bad input ------------------------------------------------------------------------------------

def test_flag_errors_are_one_line(tmp_path):
    argv = task_argv("MNLI")
    no_epochs = [a for i, a in enumerate(argv) if a != "--epochs" and argv[i - 1] != "--epochs"]
    for bad, message in (
            (no_epochs, "--epochs is required"),
            (argv + ["--dataloader-type", "cyclic"], "--dataloader-type cyclic"),
            ([a if a != os.path.join(TASKS, "MNLI/train.tsv") else str(tmp_path / "no.tsv")
              for a in argv], f"MNLI file {tmp_path / 'no.tsv'}: no such file"),
            (task_argv("RACE") + ["--valid-data", str(tmp_path / "RACE" / "dev")],
             "no such directory"),
            (task_argv("QQP", "--global-batch-size", "64", "--micro-batch-size", "2"),
             "fewer than one global batch")):
        with pytest.raises(UserError) as err:
            run_task(bad)
        assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_cli_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("index\tpromptID\n")
    argv = [a if a != os.path.join(TASKS, "MNLI/train.tsv") else str(bad)
            for a in task_argv("MNLI")]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tasks", "main.py"), *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {bad}:1: header has 2 columns; MNLI files have 12 (train), 16 "
        "(dev_matched/dev_mismatched) or 10 (test)"]
