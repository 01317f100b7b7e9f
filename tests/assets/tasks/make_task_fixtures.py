"""Write the tiny finetuning fixtures under tests/assets/tasks/ (run once; outputs committed):

    python tests/assets/tasks/make_task_fixtures.py

Invented sentences in the distributed formats (SPEC section 5), nothing copied from the real
data sets:

- MNLI/train.tsv (12 columns), dev_matched.tsv and dev_mismatched.tsv (16), test_matched.tsv
  (10): GLUE's header, index / promptID / pairID / genre / binary parses / parses / sentence1 /
  sentence2 / labels, gold_label last;
- QQP/train.tsv and dev.tsv (6 columns: id, qid1, qid2, question1, question2, is_duplicate),
  test.tsv (3: id, question1, question2);
- RACE/{train,dev,test}/{middle,high}/<n>.txt: one JSON object per file (article, answers,
  options, questions, id), questions with and without the "_" blank.

Odd sizes on purpose (data-parallel shards and micro-batches that do not divide them).
"""

import json
import os
import random

OUT = os.path.dirname(os.path.abspath(__file__))

PEOPLE = ["the baker", "a farmer", "my cousin", "the pilot", "an old sailor", "the teacher",
          "a young painter", "the mayor", "our neighbour", "the librarian", "a tired nurse",
          "the gardener"]
ACTIONS = [("bought", "a red bicycle"), ("painted", "the small fence"),
           ("cooked", "a pot of soup"), ("repaired", "the broken clock"),
           ("planted", "three apple trees"), ("wrote", "a long letter"),
           ("cleaned", "the kitchen floor"), ("carried", "a heavy box"),
           ("found", "a silver coin"), ("visited", "the quiet museum")]
TIMES = ["on monday", "last winter", "before lunch", "after the storm", "in the morning",
         "during the festival"]
PLACES = ["near the river", "in the village", "at the harbour", "behind the school",
          "on the hill"]


def _parse(sentence):
    words = sentence.rstrip(".").split()
    return "( " + " ".join(words) + " )", "(ROOT (S " + " ".join(f"(X {w})" for w in words) + \
        "))"


def mnli_pair(rng, label):
    who, (verb, what), when = rng.choice(PEOPLE), rng.choice(ACTIONS), rng.choice(TIMES)
    premise = f"{who.capitalize()} {verb} {what} {when}."
    if label == "entailment":
        hypothesis = f"Someone {verb} {what}."
    elif label == "contradiction":
        hypothesis = f"{who.capitalize()} never {verb} anything {when}."
    else:
        hypothesis = f"{who.capitalize()} {verb} {what} {rng.choice(PLACES)}."
    return premise, hypothesis


def write_tsv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        for row in [header] + rows:
            f.write("\t".join(str(c) for c in row) + "\n")


MNLI_HEAD = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
             "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
             "sentence2"]


def mnli_rows(rng, n, kind, genres):
    rows = []
    for i in range(n):
        label = rng.choice(["contradiction", "entailment", "neutral"])
        s1, s2 = mnli_pair(rng, label)
        (b1, p1), (b2, p2) = _parse(s1), _parse(s2)
        prompt = 1000 + 7 * i
        row = [i, prompt, f"{prompt}{'ecn'[i % 3]}", rng.choice(genres), b1, b2, p1, p2, s1, s2]
        if kind == "train":
            row += [label, label]
        elif kind == "dev":
            others = [label, label, rng.choice(["contradiction", "entailment", "neutral"]),
                      label]
            row += [label] + others + [label]
        rows.append(row)
    return rows


def write_mnli(rng):
    d = os.path.join(OUT, "MNLI")
    os.makedirs(d, exist_ok=True)
    matched, mismatched = ["fiction", "government", "travel"], ["letters", "oup"]
    write_tsv(os.path.join(d, "train.tsv"), MNLI_HEAD + ["label1", "gold_label"],
              mnli_rows(rng, 37, "train", matched))
    dev_head = MNLI_HEAD + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
    write_tsv(os.path.join(d, "dev_matched.tsv"), dev_head, mnli_rows(rng, 13, "dev", matched))
    write_tsv(os.path.join(d, "dev_mismatched.tsv"), dev_head,
              mnli_rows(rng, 11, "dev", mismatched))
    write_tsv(os.path.join(d, "test_matched.tsv"), MNLI_HEAD, mnli_rows(rng, 7, "test", matched))


def qqp_pair(rng, duplicate):
    who, (verb, what) = rng.choice(PEOPLE), rng.choice(ACTIONS)
    q1 = f"Why has {who} {verb} {what}?"
    if duplicate:
        q2 = f"What is the reason {who} {verb} {what}?"
    else:
        other_verb, other_what = rng.choice([a for a in ACTIONS if a[0] != verb])
        q2 = f"Where has {who} {other_verb} {other_what}?"
    return q1, q2


def write_qqp(rng):
    d = os.path.join(OUT, "QQP")
    os.makedirs(d, exist_ok=True)
    head = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    for name, n, start in (("train", 31, 0), ("dev", 13, 500)):
        rows = []
        for i in range(n):
            dup = rng.random() < 0.4
            q1, q2 = qqp_pair(rng, dup)
            rows.append([start + i, 2 * (start + i) + 1, 2 * (start + i) + 2, q1, q2, int(dup)])
        write_tsv(os.path.join(d, f"{name}.tsv"), head, rows)
    rows = [[i, *qqp_pair(rng, i % 2 == 0)] for i in range(5)]
    write_tsv(os.path.join(d, "test.tsv"), ["id", "question1", "question2"], rows)


def race_record(rng, name, level):
    who, (verb, what), when, where = (rng.choice(PEOPLE), rng.choice(ACTIONS),
                                      rng.choice(TIMES), rng.choice(PLACES))
    article = (f"{who.capitalize()} lived {where}. {when.capitalize()}, {who} {verb} {what}. "
               f"Everyone said it was a good day.\n\nLater {who} went home and slept.")
    wrong_whats = [w for _, w in ACTIONS if w != what]
    wrong_places = [p for p in PLACES if p != where]
    questions, options, answers = [], [], []
    for q in range(rng.choice([1, 2, 3])):
        if q % 2 == 0:
            question = f"What did {who} do {when}? {who.capitalize()} {verb} _ ."
            choices = rng.sample(wrong_whats, 3) + [what]
        else:
            question = f"Where did {who} live?"
            choices = rng.sample(wrong_places, 3) + [where]
        right = choices[-1]
        rng.shuffle(choices)
        questions.append(question)
        options.append(choices)
        answers.append("ABCD"[choices.index(right)])
    return {"answers": answers, "options": options, "questions": questions,
            "article": article, "id": f"{level}{name}.txt"}


def write_race(rng):
    counts = {"train": (4, 5), "dev": (3, 2), "test": (1, 2)}
    for split, (middle, high) in counts.items():
        for level, n in (("middle", middle), ("high", high)):
            d = os.path.join(OUT, "RACE", split, level)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                name = str(100 + 13 * i)
                with open(os.path.join(d, f"{name}.txt"), "w", encoding="utf-8") as f:
                    json.dump(race_record(rng, name, level), f)


def main():
    rng = random.Random(2022)
    write_mnli(rng)
    write_qqp(rng)
    write_race(rng)


if __name__ == "__main__":
    main()
