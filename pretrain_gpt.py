"""Pretrain GPT (Megatron-LM flags). Example: examples/pretrain_gpt_tiny_cpu.sh."""

if __name__ == "__main__":  # before torch's import: a SLURM signal during start-up is kept
    import sys

    from megatron.dist_signal_handler import hold_exit_signals_until_ready

    hold_exit_signals_until_ready(sys.argv[1:])

import torch

from megatron.arguments import transformer_config_from_args
from megatron.errors import UserError, run_main
from megatron.ltd.config import check_model_type
from megatron.ltd.driver import token_drop_for_batch
from megatron.training import Provider, pretrain
from megatron.utils import get_ltor_masks_and_position_ids, print_rank_0


def model_provider(args, parallel):
    """This rank's part of the GPT: its pipeline stage's layers (global ids), TP shards."""
    from megatron.model import GPTModel
    from megatron.parallel.pipeline_utils import model_layer_ids

    print_rank_0("building GPT model ...")
    layer_ids = model_layer_ids(args, parallel)
    return GPTModel(transformer_config_from_args(args), parallel=parallel,
                    pre_process=parallel.is_first_stage, post_process=parallel.is_last_stage,
                    layer_ids=layer_ids)


def datasets_provider(args, tokenizer, num_samples):
    """(train, valid, test) GPT datasets from --data-path / --split (or --mock-data)."""
    if args.mock_data:
        from megatron.data.mock_dataset import MockGPTDataset

        return tuple(MockGPTDataset(n, args.seq_length, tokenizer.vocab_size, args.seed + i)
                     if n > 0 else None for i, n in enumerate(num_samples))
    from megatron.data.dataset_utils import build_train_valid_test_datasets

    print_rank_0("> building train, validation, and test datasets for GPT ...")
    return build_train_valid_test_datasets(
        data_prefix=args.data_path, splits_string=args.split,
        train_valid_test_num_samples=num_samples, seq_length=args.seq_length, seed=args.seed,
        data_cache_path=args.data_cache_path, train_data_path=args.train_data_path,
        valid_data_path=args.valid_data_path, test_data_path=args.test_data_path,
        log=print_rank_0)


def forward_step_provider(args, tokenizer):
    device = torch.device(args.device)
    eod = tokenizer.eod

    def get_batch(data_iterator):
        batch = next(data_iterator)
        text = batch["text"].to(device=device, dtype=torch.long)
        tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()  # [b, s] each
        attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
            tokens, eod, reset_position_ids=args.reset_position_ids,
            reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss)
        return tokens, labels, loss_mask, attention_mask, position_ids, batch["index"]

    def loss_func(loss_mask, per_token_loss):
        loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        return loss, {"lm loss": loss.detach()}

    def forward_step(data_iterator, model, token_drop=None):
        """``token_drop``: what the schedule passes (see ``token_drop_for_batch``); GPT's
        special tokens are the EODs."""
        tokens, labels, loss_mask, attention_mask, position_ids, sample_ids = \
            get_batch(data_iterator)
        drop, observe = token_drop_for_batch(token_drop, sample_ids, tokens=tokens,
                                             labels=labels, loss_mask=loss_mask,
                                             special_mask=tokens == eod)
        output = model(tokens, position_ids, attention_mask, labels=labels, token_drop=drop)

        def loss(out):
            if observe is not None:
                observe(out)
            return loss_func(loss_mask, out)

        return output, loss

    return forward_step


def check_args(args):
    """GPT-only flag checks (one line each)."""
    check_model_type(args, "decoder", "pretrain_gpt.py")
    if getattr(args, "random_ltd_real_tokens_only", False):
        raise UserError("--random-ltd-real-tokens-only: GPT samples have no padding (every "
                        "token is real); the flag is for BERT (pretrain_bert.py)")


PROVIDER = Provider(model=model_provider, datasets=datasets_provider,
                    forward_step=forward_step_provider, check_args=check_args)


def main(argv=None):
    # As Megatron-LM's pretrain_gpt.py: its launch scripts leave --tokenizer-type out.
    return pretrain(PROVIDER, argv=argv, args_defaults={"tokenizer_type": "GPT2BPETokenizer"})


if __name__ == "__main__":
    run_main(main)
