"""The finetuning readers on the invented fixtures (tests/assets/tasks): MNLI and QQP TSV, RACE
JSON directories, read as Megatron-LM's tasks/ read them (fields, label order, test files,
dataset names, [CLS] a [SEP] b [SEP] inputs and truncation, RACE's choices), and bad input as
one line naming the file and line."""

import json
import os

import numpy as np
import pytest

from megatron.errors import UserError
from megatron.tokenizer import build_tokenizer
from tasks.data_utils import (build_tokens_types_paddings_from_ids, clean_text,
                              dataset_name_from_path)
from tasks.glue.mnli import MNLIDataset, read_mnli_file
from tasks.glue.qqp import QQPDataset, read_qqp_file
from tasks.race.data import (MAX_QA_LENGTH, RaceDataset, build_choice, race_directories,
                             race_eval_datasets, read_race_directory)
from training_helpers import BERT_VOCAB, ROOT

TASKS = os.path.join(ROOT, "tests", "assets", "tasks")
MNLI = os.path.join(TASKS, "MNLI")
QQP = os.path.join(TASKS, "QQP")
RACE = os.path.join(TASKS, "RACE")
CLS, SEP, PAD = 2, 3, 0


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("BertWordPieceLowerCase", vocab_file=BERT_VOCAB)


def quiet(*_):
    pass


# -- shared input building -------------------------------------------------------------------

def test_pair_input_layout_and_padding():
    ids, types, pads = build_tokens_types_paddings_from_ids([10, 11], [20, 21, 22], 10,
                                                            CLS, SEP, PAD)
    assert ids == [CLS, 10, 11, SEP, 20, 21, 22, SEP, PAD, PAD]
    assert types == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert pads == [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    ids, types, pads = build_tokens_types_paddings_from_ids([10, 11], None, 6, CLS, SEP, PAD)
    assert (ids, types, pads) == ([CLS, 10, 11, SEP, PAD, PAD], [0] * 6, [1, 1, 1, 1, 0, 0])


def test_truncation_is_megatrons():
    """[CLS] a [SEP] b reaching max_seq_length is cut to max - 1 from the end (b's tail first,
    then a's), then [SEP]: Megatron's build_tokens_types_paddings_from_ids."""
    ids, types, pads = build_tokens_types_paddings_from_ids([10, 11], [20, 21, 22, 23], 6,
                                                            CLS, SEP, PAD)
    assert ids == [CLS, 10, 11, SEP, 20, SEP] and types == [0, 0, 0, 0, 1, 1]
    assert pads == [1] * 6
    # exactly max_seq_length before the final [SEP] is trimmed too (Megatron's >=)
    ids, _, _ = build_tokens_types_paddings_from_ids([10, 11], [20, 21], 6, CLS, SEP, PAD)
    assert ids == [CLS, 10, 11, SEP, 20, SEP]
    # a longer than everything: b disappears, a is cut
    ids, types, _ = build_tokens_types_paddings_from_ids(list(range(10, 20)), [20], 5,
                                                         CLS, SEP, PAD)
    assert ids == [CLS, 10, 11, 12, SEP] and types == [0, 0, 0, 0, 1]


def test_clean_text_and_dataset_names():
    assert clean_text("A  dog\n ran .  Then\tit sat . ") == "A dog ran. Then it sat. "
    assert dataset_name_from_path("/data/glue/MNLI/dev_matched.tsv", "MNLI") == "dev-matched"
    assert dataset_name_from_path("/data/MNLI/dev_mismatched.tsv", "MNLI") == "dev-mismatched"
    assert dataset_name_from_path("/data/QQP/dev.tsv", "QQP") == "dev"
    assert dataset_name_from_path("/data/RACE/dev/middle", "RACE") == "dev-middle"
    assert dataset_name_from_path("/data/RACE/test/high/", "RACE") == "test-high"
    assert dataset_name_from_path("/tmp/x/my_dev.tsv", "MNLI") == "my-dev"


# -- MNLI --------------------------------------------------------------------------------------

def test_mnli_fields_labels_and_counts():
    logs = []
    train = read_mnli_file(os.path.join(MNLI, "train.tsv"), logs.append)
    assert len(train) == 37
    assert train[0] == {"text_a": "An old sailor carried a heavy box in the morning.",
                        "text_b": "An old sailor carried a heavy box at the harbour.",
                        "label": 2, "uid": 0}  # neutral: Megatron's order
    assert train[1]["label"] == 0  # contradiction
    labels = [s["label"] for s in train]
    assert (labels.count(0), labels.count(1), labels.count(2)) == (12, 11, 14)
    assert logs[0].endswith("train.tsv ...") and logs[-1] == " >> processed 37 samples."
    assert "gold_label" in logs[1]
    dev = read_mnli_file(os.path.join(MNLI, "dev_matched.tsv"), quiet)
    assert len(dev) == 13 and [s["label"] for s in dev].count(1) == 5  # entailment
    mismatched = read_mnli_file(os.path.join(MNLI, "dev_mismatched.tsv"), quiet)
    assert len(mismatched) == 11


def test_mnli_test_file_gets_the_test_label(tokenizer):
    logs = []
    test = read_mnli_file(os.path.join(MNLI, "test_matched.tsv"), logs.append)
    assert len(test) == 7 and {s["label"] for s in test} == {0}
    assert test[0]["text_a"] == "My cousin carried a heavy box in the morning."
    assert "setting labels to contradiction" in logs[1]
    ds = MNLIDataset("test", [os.path.join(MNLI, "test_matched.tsv")], tokenizer, 16,
                     test_label="neutral", log=quiet)
    assert ds[0]["label"] == 2


def test_mnli_dataset_items_are_the_pair_input(tokenizer):
    path = os.path.join(MNLI, "dev_matched.tsv")
    ds = MNLIDataset("dev-matched", [path], tokenizer, 64, log=quiet)
    raw = ds.samples[0]
    item = ds[0]
    a, b = tokenizer.tokenize(raw["text_a"]), tokenizer.tokenize(raw["text_b"])
    n = len(a) + len(b) + 3
    assert n < 64
    assert item["text"].tolist() == [CLS, *a, SEP, *b, SEP] + [PAD] * (64 - n)
    assert item["types"].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (64 - n)
    assert item["padding_mask"].tolist() == [1] * n + [0] * (64 - n)
    assert item["label"] == raw["label"] and item["uid"] == 0
    assert item["text"].dtype == np.int64
    short = MNLIDataset("dev", [path], tokenizer, 20, log=quiet)[0]
    assert short["text"].tolist() == ([CLS, *a, SEP, *b][:19] + [SEP])


# -- QQP ---------------------------------------------------------------------------------------

def test_qqp_fields_test_file_and_counts():
    dev = read_qqp_file(os.path.join(QQP, "dev.tsv"), quiet)
    assert len(dev) == 13
    assert dev[0] == {"text_a": "Why has the pilot carried a heavy box?",
                      "text_b": "What is the reason the pilot carried a heavy box?",
                      "label": 1, "uid": 500}
    assert len(read_qqp_file(os.path.join(QQP, "train.tsv"), quiet)) == 31
    logs = []
    test = read_qqp_file(os.path.join(QQP, "test.tsv"), logs.append)
    assert len(test) == 5 and {s["label"] for s in test} == {0}
    assert test[0]["text_a"] == "Why has the gardener bought a red bicycle?"
    assert "setting labels to 0" in logs[1]


def test_qqp_malformed_train_rows_are_skipped_with_a_warning(tmp_path):
    """As Megatron (GLUE's QQP files hold a few such rows): warned with file:line, skipped."""
    path = tmp_path / "train.tsv"
    path.write_text("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                    "1\t1\t2\tWhy?\tHow?\t0\n"
                    "2\t3\t4\tbroken row\n"
                    "3\t5\t6\t \tHow?\t1\n"
                    "4\t7\t8\tWhat?\tWho?\t1\n")
    logs = []
    samples = read_qqp_file(str(path), logs.append)
    assert [s["uid"] for s in samples] == [1, 4]
    warnings = [line for line in logs if "WARNING" in line]
    assert len(warnings) == 2
    assert f"{path}:3: 4 columns, expected 6" in warnings[0]
    assert f"{path}:4: empty question" in warnings[1]
    assert "skipped 2 malformed rows" in logs[-1]


# -- RACE --------------------------------------------------------------------------------------

def test_race_choice_text():
    assert build_choice("The cat sat on _ .", "the mat") == "The cat sat on the mat ."
    assert build_choice("Where did it sit?", "the mat") == "Where did it sit? the mat"


def test_race_directories_and_names(tokenizer):
    assert race_directories(os.path.join(RACE, "dev")) == [os.path.join(RACE, "dev", "middle"),
                                                            os.path.join(RACE, "dev", "high")]
    middle = os.path.join(RACE, "dev", "middle")
    assert race_directories(middle) == [middle]
    sets = race_eval_datasets(os.path.join(RACE, "dev"), tokenizer, 64, log=quiet)
    assert [(d.dataset_name, len(d)) for d in sets] == [("dev-middle", 7), ("dev-high", 3)]
    train = RaceDataset("training", [os.path.join(RACE, "train")], tokenizer, 64, log=quiet)
    assert len(train) == 15  # 8 middle + 7 high questions
    two = RaceDataset("training", [os.path.join(RACE, "train", "middle"),
                                   os.path.join(RACE, "train", "high")], tokenizer, 64,
                      log=quiet)
    assert len(two) == 15


def test_race_inputs_are_built_as_megatron(tokenizer):
    """Sample = one question, 4 rows [CLS] question+option [SEP] article [SEP], question+option
    cut to 128 tokens (here a smaller limit), the article cut to fit the sequence."""
    directory = os.path.join(RACE, "train", "middle")
    with open(os.path.join(directory, "100.txt")) as f:
        record = json.load(f)
    logs = []
    ds = RaceDataset("t", [directory], tokenizer, 96, log=logs.append)
    assert any("processed 4 document, 8 questions, and 8 samples" in line for line in logs)
    item = ds[0]  # first question of 100.txt (files in name order)
    assert item["text"].shape == item["types"].shape == item["padding_mask"].shape == (4, 96)
    assert item["label"] == "ABCD".index(record["answers"][0]) == 2
    article = tokenizer.tokenize(clean_text(record["article"]))
    question = record["questions"][0]
    assert "_" in question
    for c, option in enumerate(record["options"][0]):
        qa = tokenizer.tokenize(clean_text(question.replace("_", option)))
        full = [CLS, *qa, SEP, *article]
        assert len(full) + 1 > 96  # the article is cut to fit
        assert item["text"][c].tolist() == full[:95] + [SEP]
        assert item["types"][c].tolist() == [0] * (len(qa) + 2) + [1] * (96 - len(qa) - 2)
        assert item["padding_mask"][c].tolist() == [1] * 96
    second = ds[1]  # "Where did ... live?": no blank, question + " " + option
    q2 = record["questions"][1]
    qa = tokenizer.tokenize(clean_text(q2 + " " + record["options"][1][0]))
    assert second["text"][0].tolist()[:len(qa) + 2] == [CLS, *qa, SEP]
    # question+option cut to max_qa_length
    cut = read_race_directory(directory, tokenizer, max_qa_length=3, log=quiet)
    assert all(len(qa) == 3 for qa in cut[0][0])
    assert MAX_QA_LENGTH == 128


# -- bad input: one line naming the file (and line) --------------------------------------------

def _one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_files_and_directories(tmp_path, tokenizer):
    with pytest.raises(UserError) as err:
        read_mnli_file(str(tmp_path / "nowhere.tsv"), quiet)
    assert _one_line(err) == f"MNLI file {tmp_path / 'nowhere.tsv'}: no such file"
    with pytest.raises(UserError) as err:
        read_qqp_file(str(tmp_path), quiet)
    assert "is a directory" in _one_line(err)
    with pytest.raises(UserError) as err:
        RaceDataset("dev", [str(tmp_path / "RACE" / "dev")], tokenizer, 64, log=quiet)
    assert "RACE/dev: no such directory" in _one_line(err)
    with pytest.raises(UserError) as err:
        RaceDataset("dev", [str(tmp_path)], tokenizer, 64, log=quiet)
    assert f"{tmp_path}: no .txt files" in _one_line(err)


MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2"
                     "\tlabel1\tgold_label\n")


def _mnli_row(label, columns=12):
    row = ["3", "1", "1e", "fiction", "(a)", "(b)", "(a)", "(b)", "A dog ran.", "It moved.",
           label, label]
    return "\t".join(row[:columns]) + "\n"


@pytest.mark.parametrize("body,where,message", [
    (MNLI_TRAIN_HEADER + _mnli_row("entailment") + _mnli_row("entailment", 11), 3,
     "11 columns, expected 12 as the header (train file)"),
    (MNLI_TRAIN_HEADER + _mnli_row("maybe"), 2, "unknown label 'maybe'; expected one of "
     "contradiction, entailment, neutral"),
    ("a\tb\tc\n", 1, "header has 3 columns; MNLI files have 12 (train), 16"),
    (MNLI_TRAIN_HEADER + _mnli_row("neutral").replace("3\t", "x\t", 1), 2,
     "index (column 0) 'x' is not an integer"),
    (MNLI_TRAIN_HEADER + _mnli_row("neutral").replace("A dog ran.", " "), 2,
     "empty sentence1 (column 8)"),
    ("", 1, "empty file"),
], ids=["column-count", "unknown-label", "header", "index", "empty-text", "empty-file"])
def test_mnli_bad_rows(tmp_path, body, where, message):
    path = tmp_path / "train.tsv"
    path.write_text(body)
    with pytest.raises(UserError) as err:
        read_mnli_file(str(path), quiet)
    assert _one_line(err).startswith(f"{path}:{where}: {message}")


@pytest.mark.parametrize("body,where,message", [
    ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t1\t2\tWhy?\tHow?\tyes\n", 2,
     "unknown label 'yes' (is_duplicate, column 5); expected 0 or 1"),
    ("id\tquestion1\tquestion2\n0\tWhy?\n", 2, "2 columns, expected 3 (test file)"),
    ("id\tquestion1\n", 1, "header has 2 columns"),
], ids=["label", "test-columns", "header"])
def test_qqp_bad_rows(tmp_path, body, where, message):
    path = tmp_path / "dev.tsv"
    path.write_text(body)
    with pytest.raises(UserError) as err:
        read_qqp_file(str(path), quiet)
    assert _one_line(err).startswith(f"{path}:{where}: {message}")


GOOD_RACE = {"article": "A cat sat.", "questions": ["Who sat?"], "options": [["a", "b", "c", "d"]],
             "answers": ["A"], "id": "x.txt"}


@pytest.mark.parametrize("text,message", [
    ('{"article": "A cat sat.", "questions": [', "bad JSON: Expecting value (column 41)"),
    (json.dumps({**GOOD_RACE, "answers": ["E"]}), "question 0: unknown answer 'E'; expected one "
     "of A, B, C, D"),
    (json.dumps({**GOOD_RACE, "options": [["a", "b", "c"]]}), "question 0: expected 4 option "
     "strings"),
    (json.dumps({k: v for k, v in GOOD_RACE.items() if k != "article"}),
     "missing field(s) article"),
    (json.dumps({**GOOD_RACE, "answers": ["A", "B"]}), "1 questions, 1 option lists and 2 "
     "answers"),
    ("[1, 2]", "expected a JSON object, got list"),
], ids=["json", "answer", "options", "field", "lengths", "not-object"])
def test_race_bad_records(tmp_path, tokenizer, text, message):
    directory = tmp_path / "RACE" / "dev" / "middle"
    directory.mkdir(parents=True)
    (directory / "1.txt").write_text(json.dumps(GOOD_RACE) + "\n")
    (directory / "2.txt").write_text("\n" + text + "\n")
    with pytest.raises(UserError) as err:
        RaceDataset("dev", [str(directory)], tokenizer, 64, log=quiet)
    assert _one_line(err).startswith(f"{directory / '2.txt'}:2: {message}")


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_bytes(b"id\tquestion1\tquestion2\n0\tWhy \xff?\tHow?\n")
    with pytest.raises(UserError) as err:
        QQPDataset("dev", [str(path)], None, 16, log=quiet)
    assert _one_line(err).startswith(f"{path}:2: not UTF-8 text")
