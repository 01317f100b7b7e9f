"""The finetuning models (Megatron's Classification and MultipleChoice: names, checkpoint layout,
loading a BERT pretraining checkpoint under the task-head policy, joint scoring of choices) and
the finetuning training order and loss weights (EpochShuffledDataset, --keep-last)."""

import argparse
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron.errors import UserError
from megatron.model.bert import BertModel
from megatron.model.classification import Classification
from megatron.model.config import TransformerConfig
from megatron.model.module import flat_model_state
from megatron.model.multiple_choice import MultipleChoice
from tasks.finetune_utils import (Counts, EpochShuffledDataset, classifier_flops_per_sample,
                                  train_forward_step_provider)


def config(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                padded_vocab_size=64, num_tokentypes=2, init_seed=3, hidden_dropout=0.0,
                attention_dropout=0.0)
    return TransformerConfig(**{**base, **kw})


def inputs(*shape):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, shape, generator=g)
    padding = torch.ones(shape, dtype=torch.long)
    padding[..., -3:] = 0
    types_ = torch.zeros(shape, dtype=torch.long)
    types_[..., shape[-1] // 2:] = 1
    return ids, padding, types_


def test_classification_names_and_megatron_layout():
    model = Classification(config(), num_classes=3)
    names = [n for n, _ in model.named_parameters()]
    assert names[-4:] == ["language_model.pooler.dense.weight", "language_model.pooler.dense.bias",
                          "classification_head.weight", "classification_head.bias"]
    assert "language_model.embedding.tokentype_embeddings.weight" in names
    assert not any(n.startswith(("lm_head", "binary_head", "word_embeddings")) for n in names)
    nested = model.state_dict_for_save_checkpoint()
    assert set(nested) == {"language_model", "classification_head"}
    assert set(nested["language_model"]) == {"embedding", "encoder", "pooler"}
    assert model.classification_head.weight.shape == (3, 32)
    assert torch.all(model.classification_head.bias == 0)
    ids, padding, types_ = inputs(5, 16)
    assert model(ids, padding, types_).shape == (5, 3)
    assert model.tied_embedding_weight() is None  # no LM head: nothing tied across stages


def test_head_init_is_seeded_by_part():
    a, b = Classification(config(), 3), Classification(config(), 3)
    assert torch.equal(a.classification_head.weight, b.classification_head.weight)
    c = Classification(config(init_seed=4), 3)
    assert not torch.equal(a.classification_head.weight, c.classification_head.weight)
    # Megatron's get_linear_layer: normal(0, init_method_std)
    wide = Classification(config(hidden_size=256, num_attention_heads=4), 64)
    assert abs(wide.classification_head.weight.std().item() - 0.02) < 0.002


def test_bert_checkpoint_loads_under_the_task_head_policy():
    bert = BertModel(config(), add_binary_head=True)
    state = bert.state_dict_for_save_checkpoint()
    model = Classification(config(init_seed=9), 3)
    head = model.classification_head.weight.clone()
    missing, ignored = model.load_checkpoint_state(state, "bert", Classification.load_policy())
    assert missing == ["classification_head.weight", "classification_head.bias"]
    assert sorted({n.split(".")[0] for n in ignored}) == ["binary_head", "lm_head"]
    for name, value in flat_model_state(state).items():
        if name.startswith("language_model."):
            assert torch.equal(model.state_dict()[name], value), name
    assert torch.equal(model.classification_head.weight, head)  # initialised, not loaded
    # strict (no policy): the BERT heads are refused in one line
    with pytest.raises(UserError, match="does not match this model: missing 2"):
        Classification(config(), 3).load_checkpoint_state(state, "bert")
    # a classifier's own checkpoint loads strictly and completely
    own = model.state_dict_for_save_checkpoint()
    again = Classification(config(init_seed=1), 3)
    assert again.load_checkpoint_state(own, "own") == ([], [])
    assert torch.equal(again.classification_head.weight, head)


def test_policy_ignores_the_head_copy_and_refuses_other_models():
    policy = MultipleChoice.load_policy()
    own = ["language_model.pooler.dense.weight", "multichoice_head.weight"]
    saved = ["language_model.pooler.dense.weight", "word_embeddings.weight", "lm_head.bias",
             "binary_head.weight", "language_model.output_layer.weight"]
    ok_missing, ok_ignored, missing, unexpected = policy.split(own, saved)
    assert ok_missing == ["multichoice_head.weight"] and missing == [] and unexpected == []
    assert len(ok_ignored) == 4
    # a GPT checkpoint lacks the pooler and token types: refused by name
    _, _, missing, _ = policy.split(own + ["language_model.embedding.tokentype_embeddings.weight"],
                                    ["language_model.embedding.word_embeddings.weight"])
    assert "language_model.pooler.dense.weight" in missing


def test_multiple_choice_scores_each_choice_with_the_same_encoder():
    model = MultipleChoice(config()).eval()
    names = [n for n, _ in model.named_parameters()]
    assert names[-2:] == ["multichoice_head.weight", "multichoice_head.bias"]
    assert model.multichoice_head.weight.shape == (1, 32)
    ids, padding, types_ = inputs(3, 4, 16)
    logits = model(ids, padding, types_)
    assert logits.shape == (3, 4)
    for c in range(4):
        alone = model(ids[:, c:c + 1], padding[:, c:c + 1], types_[:, c:c + 1])
        torch.testing.assert_close(alone[:, 0], logits[:, c], rtol=1e-5, atol=1e-6)


def test_head_dropout_is_the_hidden_dropout():
    model = Classification(config(hidden_dropout=0.5), 3)
    assert model.classification_dropout.p == 0.5
    assert MultipleChoice(config(hidden_dropout=0.25)).multichoice_dropout.p == 0.25


def test_flops_count_the_encoder_rows_without_lm_head():
    args = argparse.Namespace(seq_length=16, num_layers=2, hidden_size=32, ffn_hidden_size=None,
                              recompute_granularity=None)
    one = classifier_flops_per_sample(1)(args)
    assert one == 3 * 2 * 16 * (2 * (4 * 32 * 32 + 2 * 32 * 128) + 4 * 16 * 32)
    assert classifier_flops_per_sample(4)(args) == 4 * one


# -- training order and weights ------------------------------------------------------------------

class _Items(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        return {"value": np.int64(idx)}


def _epoch(ds, e):
    items = [ds[e * ds.samples_per_epoch + p] for p in range(ds.samples_per_epoch)]
    return [int(i["value"]) for i in items], [float(i["loss_weight"]) for i in items]


def test_each_epoch_is_a_seeded_permutation_in_whole_global_batches():
    ds = EpochShuffledDataset(_Items(11), epochs=3, global_batch_size=4, seed=1234)
    assert ds.iterations_per_epoch == 2 and ds.samples_per_epoch == 8
    assert len(ds) == (3 * 2 + 1) * 4  # one spare batch for a resume after the end
    orders = [_epoch(ds, e) for e in range(3)]
    for values, weights in orders:
        assert len(set(values)) == 8 and weights == [1.0] * 8  # 3 samples dropped
    assert orders[0][0] != orders[1][0]  # a new order every epoch
    again = EpochShuffledDataset(_Items(11), epochs=3, global_batch_size=4, seed=1234)
    assert _epoch(again, 1) == orders[1]  # a pure function of (seed, epoch)
    other = EpochShuffledDataset(_Items(11), epochs=3, global_batch_size=4, seed=1235)
    assert _epoch(other, 0)[0] != orders[0][0]  # seeds differ
    assert {float(ds[len(ds) - 1]["loss_weight"])} == {0.0}


def test_keep_last_fills_the_last_batch_with_zero_weights():
    ds = EpochShuffledDataset(_Items(11), epochs=2, global_batch_size=4, seed=7, keep_last=True)
    assert ds.iterations_per_epoch == 3
    values, weights = _epoch(ds, 1)
    assert sorted(values[:11]) == list(range(11))
    assert weights == pytest.approx([1.0] * 8 + [4 / 3] * 3 + [0.0])
    with pytest.raises(UserError, match="fewer than one global batch"):
        EpochShuffledDataset(_Items(3), epochs=1, global_batch_size=4, seed=1)
    assert EpochShuffledDataset(_Items(3), 1, 4, 1, keep_last=True).iterations_per_epoch == 1


class _Logits(torch.nn.Module):
    """A stand-in model: fixed logits per sample id."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, text, padding_mask, tokentype_ids=None, token_drop=None):
        return self.table[text[:, 0]]


def test_weighted_loss_is_the_mean_over_the_real_samples():
    """A global batch of 4 (2 micro-batches of 2, as the schedule averages them) with one
    filling sample: the loss is the mean cross entropy of the 3 real samples, and 'lm loss'
    reports the same as a ratio."""
    torch.manual_seed(0)
    table = torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 1])
    weights = torch.tensor([4 / 3, 4 / 3, 4 / 3, 0.0])
    args = argparse.Namespace(device="cpu")
    tokenizer = types.SimpleNamespace(cls=2, sep=3)
    step = train_forward_step_provider()(args, tokenizer)
    total, num, den = 0.0, 0.0, 0.0
    for mb in range(2):
        rows = slice(2 * mb, 2 * mb + 2)
        batch = {"text": torch.arange(4)[rows].view(2, 1).repeat(1, 5),
                 "types": torch.zeros(2, 5), "padding_mask": torch.ones(2, 5),
                 "label": labels[rows], "loss_weight": weights[rows],
                 "index": torch.arange(2)}
        output, loss_func = step(iter([batch]), _Logits(table))
        loss, report = loss_func(output)
        total += loss.item() / 2
        num += float(report["lm loss"][0])
        den += float(report["lm loss"][1])
    expected = F.cross_entropy(table[:3], labels[:3]).item()
    assert total == pytest.approx(expected, rel=1e-6)
    assert den == 3 and num / den == pytest.approx(expected, rel=1e-6)


def test_counts_accuracy_and_f1_from_sums():
    c = Counts(correct=7, total=13, tp=5, fp=1, fn=2) + Counts(correct=1, total=2, tp=1)
    assert (c.correct, c.total, c.tp, c.fp, c.fn) == (8, 15, 6, 1, 2)
    assert c.accuracy == pytest.approx(800 / 15)
    assert c.f1 == pytest.approx(100 * 12 / 15)
    assert Counts().f1 == 0.0
