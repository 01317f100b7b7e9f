"""The lm-evaluation-harness model ``megatron-ltd`` (tasks/lm_eval_adapter.py).

Scores are checked against direct forwards of the checkpoint's GPTModel (log-softmax sums,
greedy flags, whole-text losses), batching against one request at a time, generation against
tools/generate_text.py's greedy output, a TP2/PP2 checkpoint against its TP1/PP1 original, and
lm-eval's command line end to end on the local offline tasks in tests/assets/lm_eval.
"""

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from megatron.errors import UserError  # noqa: E402
from tasks.lm_eval_adapter import MODEL_NAME, MegatronLM  # noqa: E402
from test_zeroshot_gpt import direct_model  # noqa: E402
from training_helpers import ROOT, gpt_argv, run  # noqa: E402

ASSETS = os.path.join(ROOT, "tests", "assets", "lm_eval")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}

PAIRS = [("The harbour light was", " first lit in spring"),
         ("Marsh orchids grow in", " wet meadows"),
         ("Marsh orchids grow in", " dry"),  # one-token options sharing a context
         ("Marsh orchids grow in", " wet"),
         ("Marsh orchids grow in", " damp ground beside slow rivers"),  # two long branches
         ("A", " b c d e f g h i j k l m n o p q r s t u v w x y z and more words here"),
         ("The harbour light was", " first lit in spring")]  # a duplicate


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Many tiny forwards: one intra-op thread is far faster than two on a shared CPU."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(data_prefix, tmp_path_factory):
    """A tiny GPT (2 layers, hidden 32, seq 32, padded vocab 1536) after 4 training steps."""
    ckpt = str(tmp_path_factory.mktemp("lm_eval") / "ckpt")
    run(gpt_argv(data_prefix, "--save", ckpt, "--eval-iters", "0", iters=4))
    return ckpt


@pytest.fixture(scope="module")
def lm(checkpoint):
    return MegatronLM(load=checkpoint, batch_size=4)


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def direct_loglikelihood(model, vocab_size, context, continuation):
    """(sum of log-softmax of the continuation tokens, all greedy) from one plain forward."""
    tokens = torch.tensor([context + continuation[:-1]])
    with torch.no_grad():
        logits = model(tokens)[0, -len(continuation):, :vocab_size].float()
    logprobs = F.log_softmax(logits, -1)[torch.arange(len(continuation)), continuation]
    return float(logprobs.sum()), logits.argmax(-1).tolist() == continuation


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model(MODEL_NAME) is MegatronLM


def test_loglikelihood_equals_direct_log_softmax(lm, checkpoint):
    model = direct_model(checkpoint)
    got = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        ctx, cont = lm._encode_pair(context, continuation)
        want_logprob, want_greedy = direct_loglikelihood(model, lm.vocab_size, ctx, cont)
        assert logprob == pytest.approx(want_logprob, rel=1e-5, abs=1e-5)
        assert greedy == want_greedy
    assert got[0] == got[-1]


def test_greedy_flag_is_true_for_the_models_own_continuation(lm, checkpoint):
    model = direct_model(checkpoint)
    context = lm.tok_encode("The harbour light was")
    with torch.no_grad():
        best = int(model(torch.tensor([context]))[0, -1, :lm.vocab_size].argmax())
    (_, greedy), = lm._loglikelihood_tokens([(None, context, [best])])
    assert greedy


def test_batched_equals_one_at_a_time(checkpoint, lm):
    reqs = requests("loglikelihood", PAIRS)
    single = MegatronLM(load=checkpoint, batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    for batch_size in (2, 4, 16):
        lm.batch_size = batch_size
        batched = lm.loglikelihood(reqs, disable_tqdm=True)
        for (a, ga), (b, gb) in zip(batched, single):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and ga == gb
    lm.batch_size = 4


def test_left_truncation_to_max_length(lm, checkpoint):
    model = direct_model(checkpoint)
    context = lm.tok_encode(" ".join(["word"] * 40))  # longer than max_length 32
    continuation = lm.tok_encode(" end")
    (logprob, _), = lm._loglikelihood_tokens([(None, context, continuation)])
    kept = (context + continuation)[-(lm.max_length + 1):]
    want, _ = direct_loglikelihood(model, lm.vocab_size, kept[:-len(continuation)],
                                   continuation)
    assert lm.max_length == 32 and logprob == pytest.approx(want, rel=1e-5)


def test_rolling_loglikelihood_of_one_window_is_the_full_text_loss(lm, checkpoint):
    model = direct_model(checkpoint)
    text = "Marsh orchids grow in wet meadows and fens."
    tokens = lm.tok_encode(text)
    assert len(tokens) <= lm.max_length
    with torch.no_grad():
        logits = model(torch.tensor([[lm.eot_token_id] + tokens[:-1]]))[0, :, :lm.vocab_size]
    full_text_loss = float(F.cross_entropy(logits.float(), torch.tensor(tokens),
                                           reduction="sum"))
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]),
                                      disable_tqdm=True)
    assert got == pytest.approx(-full_text_loss, rel=1e-5)


def test_rolling_loglikelihood_over_several_windows(lm, checkpoint):
    model = direct_model(checkpoint)
    texts = [open(os.path.join(ROOT, "tests", "assets", "zeroshot", "wiki.test.tokens"))
             .read()[:700], "short one"]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]),
                                   disable_tqdm=True)
    for text, value in zip(texts, got):
        tokens = lm.tok_encode(text)
        want = 0.0
        for context, target in map(make_disjoint_window, get_rolling_token_windows(
                tokens, lm.eot_token_id, lm.max_length, 1)):
            want += direct_loglikelihood(model, lm.vocab_size, context, target)[0]
        assert value == pytest.approx(want, rel=1e-5)
    assert len(lm.tok_encode(texts[0])) > 3 * lm.max_length


def test_greedy_generation_equals_generate_text(lm, checkpoint):
    from tools import generate_text

    prompts = ["The harbour light was", "Marsh orchids", "A"]
    got = lm.generate_until(requests("generate_until", [
        (p, {"until": [], "max_gen_toks": 7, "do_sample": False}) for p in prompts]),
        disable_tqdm=True)
    for prompt, text in zip(prompts, got):
        out = io.StringIO()
        generate_text.main(["--load", checkpoint, "--prompt", prompt, "--greedy",
                            "--max-new-tokens", "7"], out=out)
        assert out.getvalue().splitlines()[1] == prompt + text


def test_generation_stops_at_a_stop_string(lm):
    (free,) = lm.generate_until(requests("generate_until", [
        ("The harbour light was", {"until": [], "max_gen_toks": 8})]), disable_tqdm=True)
    stop = free[2:4]
    assert len(free) > 4 and stop
    (stopped,) = lm.generate_until(requests("generate_until", [
        ("The harbour light was", {"until": [stop], "max_gen_toks": 8})]), disable_tqdm=True)
    assert stopped == free.split(stop)[0]


def test_tp2_pp2_checkpoint_scores_as_its_original(checkpoint, lm, tmp_path):
    from tools.checkpoint_util import convert

    sharded = str(tmp_path / "tp2pp2")
    convert(checkpoint, sharded, 2, 2, log=lambda *a: None)
    reqs = requests("loglikelihood", PAIRS)
    for (a, ga), (b, gb) in zip(MegatronLM(load=sharded, batch_size=4).loglikelihood(
            reqs, disable_tqdm=True), lm.loglikelihood(reqs, disable_tqdm=True)):
        assert a == pytest.approx(b, rel=1e-6) and ga == gb


def test_bfloat16_is_close_to_float32(checkpoint, lm):
    reqs = requests("loglikelihood", PAIRS[:2])
    half = MegatronLM(load=checkpoint, dtype="bfloat16").loglikelihood(reqs, disable_tqdm=True)
    for (a, _), (b, _) in zip(half, lm.loglikelihood(reqs, disable_tqdm=True)):
        assert a == pytest.approx(b, rel=0.05)


def test_command_line_device_and_batch_size_do_not_clash_with_model_args(checkpoint):
    model = MegatronLM.create_from_arg_string(
        f"load={checkpoint},device=cpu,batch_size=3",
        {"device": "cuda:0", "batch_size": 1, "max_batch_size": None})
    assert model.batch_size == 3 and model.device == torch.device("cpu")


@pytest.mark.parametrize("args,needle", [
    ({}, "need load="),
    ({"load": "{tmp}/nope"}, "latest_checkpointed_iteration.txt"),
    ({"load": "{ckpt}", "dtype": "int8"}, "dtype=int8"),
    ({"load": "{ckpt}", "batch_size": "auto"}, "batch_size=auto"),
    ({"load": "{ckpt}", "colour": "blue"}, "unknown model_args colour"),
    ({"load": "{ckpt}", "vocab_file": "{tmp}/big-vocab.json"}, "do not belong"),
])
def test_bad_model_args_are_one_line_errors(checkpoint, tmp_path, args, needle):
    from training_helpers import VOCAB

    vocab = json.load(open(VOCAB))
    vocab.update({f"extra{i}": len(vocab) + i for i in range(600)})
    (tmp_path / "big-vocab.json").write_text(json.dumps(vocab))
    args = {k: v.format(tmp=tmp_path, ckpt=checkpoint) for k, v in args.items()}
    with pytest.raises(UserError, match=needle):
        MegatronLM(**args)


def test_corrupt_checkpoint_file_is_a_user_error(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    path = broken / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        MegatronLM(load=str(broken))


def multiple_choice_accuracy(lm):
    """Accuracy on tests/assets/lm_eval/tiny_mc.jsonl, each option scored directly."""
    correct = 0
    docs = [json.loads(line) for line in open(os.path.join(ASSETS, "tiny_mc.jsonl"))]
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = lm.loglikelihood(requests("loglikelihood", [
            (context, " " + choice) for choice in doc["choices"]]), disable_tqdm=True)
        best = max(range(len(scores)), key=lambda i: scores[i][0])
        correct += best == doc["label"]
    return correct / len(docs)


@pytest.mark.slow
def test_lm_eval_command_line_on_local_tasks(checkpoint, lm, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.lm_eval_adapter", "--model", MODEL_NAME,
         "--model_args", f"load={checkpoint}", "--device", "cpu", "--batch_size", "4",
         "--tasks", "megatron_ltd_tiny", "--include_path", ASSETS, "--output_path", str(out)],
        cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = [os.path.join(d, f) for d, _, names in os.walk(out) for f in names
               if f.startswith("results") and f.endswith(".json")]
    results = json.load(open(path))["results"]
    assert set(results) == {"megatron_ltd_tiny_mc", "megatron_ltd_tiny_ppl",
                            "megatron_ltd_tiny_gen"}
    assert results["megatron_ltd_tiny_mc"]["acc,none"] == pytest.approx(
        multiple_choice_accuracy(lm))
    assert results["megatron_ltd_tiny_ppl"]["word_perplexity,none"] > 1
    assert 0 <= results["megatron_ltd_tiny_gen"]["exact_match,none"] <= 1


# -- the paper's 19 zero-shot tasks (tasks/zeroshot_gpt/run_paper_tasks.py) -------------------

def test_paper_tasks_are_the_19_of_the_paper():
    from tasks.zeroshot_gpt.run_paper_tasks import PAPER_TASKS

    assert [t.name for t in PAPER_TASKS] == [
        "HellaSwag", "LAMBADA", "TriviaQA", "WebQs", "Winogrande", "PIQA", "ARC-Challenge",
        "ARC-Easy", "OpenBookQA", "RACE-h", "BoolQ", "COPA", "RTE", "WSC", "MultiRC", "ReCoRD",
        "ANLI-R1", "ANLI-R2", "ANLI-R3"]
    assert len({t.lm_eval_task for t in PAPER_TASKS}) == 19


def test_task_selection_and_mapping():
    from tasks.zeroshot_gpt.run_paper_tasks import parse_pairs, select_tasks

    chosen = select_tasks(["PIQA", "ReCoRD"], {"PIQA": "my_piqa", "ReCoRD": "my_record:em"})
    assert [(t.name, t.lm_eval_task, t.metric) for t in chosen] == [
        ("PIQA", "my_piqa", "acc"), ("ReCoRD", "my_record", "em")]
    assert len(select_tasks()) == 19
    with pytest.raises(UserError, match="Piqa: not one of the paper's tasks"):
        select_tasks(["Piqa"])
    with pytest.raises(UserError, match="--task-map PIQA: expected NAME=VALUE"):
        parse_pairs(["PIQA"], "--task-map")
    with pytest.raises(UserError, match="--checkpoint a: given twice"):
        parse_pairs(["a=x", "a=y"], "--checkpoint")


def test_tables_with_a_missing_task(tmp_path):
    from tasks.zeroshot_gpt.run_paper_tasks import select_tasks, write_tables

    tasks = select_tasks(["PIQA", "COPA", "RTE"])
    scores = {"baseline": {"PIQA": (60.0, 1.5), "RTE": (50.0, 3.0)},
              "random-ltd": {"PIQA": (62.0, 1.5), "RTE": (53.0, None)}}
    text = write_tables(scores, tasks, {"COPA": "no local data (copa: ...)"}, str(tmp_path))
    assert "| PIQA | piqa | acc | 60.00 ± 1.50 | 62.00 ± 1.50 |" in text
    assert "| RTE | rte | acc | 50.00 ± 3.00 | 53.00 |" in text
    assert "| COPA | copa | acc | no data | no data |" in text
    assert "| **Average (2 of 3 tasks)** | | | 55.00 | 57.50 |" in text
    assert "- COPA: no local data (copa: ...)" in text
    rows = list(csv.DictReader(open(tmp_path / "zero_shot.csv")))
    assert [(r["task"], r["checkpoint"], r["value"]) for r in rows if r["task"] == "Average"] \
        == [("Average", "baseline", "55.0000"), ("Average", "random-ltd", "57.5000")]
    assert {r["status"] for r in rows if r["task"] == "COPA"} == {"no local data (copa: ...)"}


def test_metric_lookup():
    from tasks.zeroshot_gpt.run_paper_tasks import metric_of, select_tasks

    (piqa,) = select_tasks(["PIQA"])
    results = {"results": {"piqa": {"acc,none": 0.5, "acc_stderr,none": 0.01,
                                    "acc_norm,none": 0.6}}}
    assert metric_of(results, piqa) == pytest.approx((50.0, 1.0))
    with pytest.raises(UserError, match="no 'f1' for piqa"):
        metric_of(results, piqa._replace(metric="f1"))


@pytest.mark.slow
def test_paper_task_runner_on_local_and_missing_tasks(checkpoint, lm, tmp_path):
    missing = tmp_path / "tasks"
    missing.mkdir()
    (missing / "missing.yaml").write_text(
        "task: megatron_ltd_missing\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path}/not_here.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "tasks/zeroshot_gpt/run_paper_tasks.py", "--checkpoint",
         f"baseline={checkpoint}", "--checkpoint", f"copy={checkpoint}", "--output-dir",
         str(out), "--tasks", "PIQA,COPA,HellaSwag", "--task-map", "PIQA=megatron_ltd_tiny_mc",
         "--task-map", "COPA=megatron_ltd_missing", "--include-path", ASSETS,
         "--include-path", str(missing), "--batch-size", "4"],
        cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "zero_shot.md").read_text()
    acc = 100 * multiple_choice_accuracy(lm)
    assert f"| PIQA | megatron_ltd_tiny_mc | acc | {acc:.2f} ± " in table
    assert "| COPA | megatron_ltd_missing | acc | no data | no data |" in table
    assert "| HellaSwag | hellaswag | acc | no data | no data |" in table
    assert f"| **Average (1 of 3 tasks)** | | | {acc:.2f} | {acc:.2f} |" in table
    assert "- COPA: no local data (megatron_ltd_missing: FileNotFoundError" in table
    assert "- HellaSwag: no local data (hellaswag:" in table
    assert "lacking HellaSwag: no local data" in proc.stdout
    assert json.load(open(out / "lm_eval_copy.json"))["megatron_ltd_tiny_mc"]["acc,none"] == \
        pytest.approx(acc / 100)
