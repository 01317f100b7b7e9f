"""Pretrain BERT (Megatron-LM flags). Example: examples/pretrain_bert_large.sh."""

if __name__ == "__main__":  # before torch's import: a SLURM signal during start-up is kept
    import sys

    from megatron.dist_signal_handler import hold_exit_signals_until_ready

    hold_exit_signals_until_ready(sys.argv[1:])

import dataclasses

import torch
import torch.nn.functional as F

from megatron.arguments import transformer_config_from_args
from megatron.errors import NotImplementedYet, UserError, run_main
from megatron.ltd.config import check_model_type, sctd_settings_from_args
from megatron.ltd.driver import token_drop_for_batch
from megatron.ltd.sctd import SCTDOutput, sctd_loss
from megatron.training import Provider, pretrain
from megatron.utils import print_rank_0


def model_provider(args, parallel):
    """This rank's part of BERT: its pipeline stage's layers (global ids), TP shards. With the
    binary head (the default) the model has Megatron's two token types."""
    from megatron.model import BertModel
    from megatron.parallel.pipeline_utils import model_layer_ids

    print_rank_0("building BERT model ...")
    layer_ids = model_layer_ids(args, parallel)
    config = transformer_config_from_args(args, num_tokentypes=2 if args.bert_binary_head else 0)
    return BertModel(config, parallel=parallel, pre_process=parallel.is_first_stage,
                     post_process=parallel.is_last_stage, layer_ids=layer_ids,
                     add_binary_head=args.bert_binary_head)


def _special_ids(tokenizer):
    try:
        return {name: getattr(tokenizer, name) for name in ("cls", "sep", "pad", "mask")}
    except (AttributeError, NotImplementedError):
        raise UserError(f"--tokenizer-type {type(tokenizer).__name__}: BERT needs a tokenizer "
                        "with [CLS], [SEP], [PAD] and [MASK] (BertWordPieceLowerCase or "
                        "BertWordPieceCase)") from None


def datasets_provider(args, tokenizer, num_samples):
    """(train, valid, test) BERT datasets from sentence-level --data-path / --split (or
    --mock-data)."""
    special = _special_ids(tokenizer)
    if args.mock_data:
        from megatron.data.mock_dataset import MockBertDataset

        return tuple(MockBertDataset(n, args.seq_length, tokenizer.vocab_size,
                                     cls_id=special["cls"], sep_id=special["sep"],
                                     pad_id=special["pad"], mask_id=special["mask"],
                                     seed=args.seed + i, mask_prob=args.mask_prob)
                     if n > 0 else None for i, n in enumerate(num_samples))
    from megatron.data.bert_dataset import build_bert_train_valid_test_datasets

    print_rank_0("> building train, validation, and test datasets for BERT ...")
    return build_bert_train_valid_test_datasets(
        data_prefix=args.data_path, splits_string=args.split,
        train_valid_test_num_samples=num_samples, max_seq_length=args.seq_length,
        masked_lm_prob=args.mask_prob, short_seq_prob=args.short_seq_prob, seed=args.seed,
        binary_head=args.bert_binary_head, tokenizer=tokenizer,
        data_cache_path=args.data_cache_path, train_data_path=args.train_data_path,
        valid_data_path=args.valid_data_path, test_data_path=args.test_data_path,
        log=print_rank_0)


@dataclasses.dataclass
class BertBatch:
    tokens: torch.Tensor        # [b, s] (masked)
    types: torch.Tensor         # [b, s] segment A 0 / B 1
    sentence_order: torch.Tensor  # [b] 1 = segments swapped
    loss_mask: torch.Tensor     # [b, s] float, 1 at masked positions
    lm_labels: torch.Tensor     # [b, s] original ids at masked positions, -1 elsewhere
    padding_mask: torch.Tensor  # [b, s] 1 = real token
    sample_ids: torch.Tensor    # [b] dataset indices (random-LTD's draws)


def forward_step_provider(args, tokenizer):
    device = torch.device(args.device)
    special = _special_ids(tokenizer)
    binary_head = args.bert_binary_head
    # TokenBypass (and SCTD, which drops as it) always keeps [MASK] and [UNK] too (Hou et al.)
    always_kept = [special["cls"], special["sep"]]
    if getattr(args, "random_ltd_method", None) in ("tokenbypass", "sctd"):
        always_kept += [special["mask"], getattr(tokenizer, "unk", None)]
    always_kept = [i for i in always_kept if i is not None]
    sctd = sctd_settings_from_args(args)
    sctd_weights = (sctd["sctd_mlm_weight"], sctd["sctd_kl_weight"])

    def get_batch(data_iterator):
        batch = next(data_iterator)

        def field(key, dtype=torch.long):
            return batch[key].to(device=device, dtype=dtype)

        return BertBatch(tokens=field("text"), types=field("types"),
                         sentence_order=field("is_random"), loss_mask=field("loss_mask",
                                                                            torch.float),
                         lm_labels=field("labels"), padding_mask=field("padding_mask"),
                         sample_ids=batch["index"])

    def loss_func(loss_mask, sentence_order, output):
        if isinstance(output, SCTDOutput):  # SCTD's dual step: both passes and the KL terms
            return sctd_loss(output, loss_mask, sentence_order, mlm_weight=sctd_weights[0],
                             kl_weight=sctd_weights[1])
        lm_loss_, sop_logits = output
        lm_loss = (lm_loss_.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        if sop_logits is None:
            return lm_loss, {"lm loss": lm_loss.detach()}
        sop_loss = F.cross_entropy(sop_logits.view(-1, 2).float(), sentence_order.view(-1),
                                   ignore_index=-1)
        return lm_loss + sop_loss, {"lm loss": lm_loss.detach(), "sop loss": sop_loss.detach()}

    def forward_step(data_iterator, model, token_drop=None):
        """One micro-batch: Megatron's BERT forward and its 'lm loss' / 'sop loss'.
        ``token_drop``: see ``token_drop_for_batch``; [CLS]/[SEP] are the special tokens
        (TokenBypass/SCTD: also [MASK]/[UNK]), padding is never a special token."""
        b = get_batch(data_iterator)
        special_mask = torch.isin(b.tokens, torch.tensor(always_kept, device=b.tokens.device))
        drop, observe = token_drop_for_batch(
            token_drop, b.sample_ids, tokens=b.tokens, labels=b.lm_labels,
            loss_mask=b.loss_mask, special_mask=special_mask & (b.padding_mask > 0),
            padding_mask=b.padding_mask == 0)
        output = model(b.tokens, b.padding_mask,
                       tokentype_ids=b.types if binary_head else None,
                       lm_labels=b.lm_labels, token_drop=drop)

        def loss(out):
            if observe is not None:
                observe(out[0])
            return loss_func(b.loss_mask, b.sentence_order, out)

        return output, loss

    return forward_step


def check_args(args):
    """BERT-only flag checks (one line each)."""
    if args.position_embedding_type != "learned_absolute":
        raise UserError("pretrain_bert.py: BERT uses learned absolute position embeddings; "
                        "leave out --position-embedding-type/--use-rotary-position-embeddings")
    check_model_type(args, "encoder", "pretrain_bert.py")
    bert_methods = ("random", "tokenbypass", "sctd")
    if getattr(args, "random_ltd", False) and args.random_ltd_method not in bert_methods:
        raise NotImplementedYet(
            f"--random-ltd-method {args.random_ltd_method} for BERT is not implemented yet; use "
            f"one of {', '.join(bert_methods)}")


PROVIDER = Provider(model=model_provider, datasets=datasets_provider,
                    forward_step=forward_step_provider, check_args=check_args)


def main(argv=None):
    # As Megatron-LM's pretrain_bert.py: its launch scripts leave --tokenizer-type out.
    return pretrain(PROVIDER, argv=argv, args_defaults={"tokenizer_type": "BertWordPieceLowerCase"})


if __name__ == "__main__":
    run_main(main)
