"""Shared by the training tests: a tiny learnable corpus, GPT flags, an in-process run."""

import os
import subprocess
import sys

import numpy as np

import pretrain_gpt
from megatron.data.indexed_dataset import IndexedDatasetBuilder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "tests", "assets", "tokenizers")
VOCAB = os.path.join(ASSETS, "gpt2-vocab.json")
MERGES = os.path.join(ASSETS, "gpt2-merges.txt")
BERT_VOCAB = os.path.join(ASSETS, "bert-vocab.txt")


def make_corpus(out):
    """A small corpus with learnable structure: documents repeat short token patterns."""
    prefix = os.path.join(str(out), "corpus_text_document")
    rng = np.random.default_rng(0)
    patterns = [rng.integers(0, 400, size=rng.integers(3, 8)) for _ in range(20)]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(200):
        doc = np.concatenate([patterns[i] for i in rng.integers(0, 20, size=12)] + [[1500]])
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def gpt_argv(data_prefix, *extra, iters=8):
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "1",
            "--lr-decay-style", "cosine", "--min-lr", "1e-4",
            "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
            "--data-path", data_prefix, "--split", "90,10,0",
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB,
            "--merge-file", MERGES, "--make-vocab-size-divisible-by", "64",
            "--log-interval", "2", "--eval-interval", "4", "--eval-iters", "1",
            "--num-workers", "0", "--device", "cpu", "--seed", "7", *extra]


def tiny_bert_argv(*extra, iters=4):
    """A 4-layer BERT (seq 32, global batch 4 of micro-batch 1) on --mock-data, dropout 0."""
    return ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--max-position-embeddings", "32",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr", "0.05", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
            "--min-lr", "1e-3", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--mock-data", "--tokenizer-type", "BertWordPieceLowerCase",
            "--vocab-file", BERT_VOCAB, "--make-vocab-size-divisible-by", "64",
            "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "0",
            "--num-workers", "0", "--device", "cpu", "--seed", "7", *extra]


def run(argv):
    logs = []
    result = pretrain_gpt.pretrain(pretrain_gpt.datasets_provider, pretrain_gpt.model_provider,
                                   pretrain_gpt.forward_step_provider, argv=argv,
                                   log=logs.append)
    return result, logs


def launch_ranks(argv, world_size=2, rank_env=lambda rank: {}):
    """pretrain_gpt.py on ``world_size`` ranks as torchrun starts them (rank 0's stdout piped,
    the others' discarded); every rank's stderr is piped; ``rank_env(rank)`` adds variables."""
    from distributed_harness import free_port

    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS="1", **rank_env(rank))
        procs.append(subprocess.Popen(
            [sys.executable, "pretrain_gpt.py", *map(str, argv)], cwd=ROOT, env=env,
            stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True))
    return procs


def nccl_rank_env(world_size):
    """``launch_ranks``' ``rank_env`` for NCCL ranks on this machine's GPUs. With fewer GPUs than
    ranks, ranks share them, each with its own NCCL_HOSTID: NCCL refuses two ranks of one host
    on one GPU ("Duplicate GPU detected"); as separate hosts they talk through its socket
    transport (InfiniBand off). NCCL_HOSTID replaces the host hash NCCL compares, the same
    override clusters use where hostnames collide; public test set-ups run 2-3 NCCL ranks on one
    GPU this way. Not yet run here: no GPU has been lent to this project's sessions."""
    import torch

    if torch.cuda.device_count() >= world_size:
        return lambda rank: {}
    return lambda rank: {"NCCL_HOSTID": f"megatron-ltd-test-{rank}", "NCCL_IB_DISABLE": "1"}
