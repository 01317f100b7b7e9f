"""Our GPT checkpoints as an lm-evaluation-harness (0.4.x) model: ``megatron-ltd``.

    python -m tasks.lm_eval_adapter --model megatron-ltd \\
        --model_args load=checkpoints/gpt-350m,dtype=bfloat16 --device cuda --batch_size 16 \\
        --tasks hellaswag,piqa,lambada_openai --output_path results/

``python -m tasks.lm_eval_adapter ARGS`` is lm-eval's own command line (``lm_eval ARGS``, every
flag of it) with this model registered: lm-eval 0.4 finds models only in its registry (no
plugin entry points), so the module that registers one must be imported first. From Python:
``import tasks.lm_eval_adapter`` and then ``lm_eval.simple_evaluate(model="megatron-ltd",
model_args="load=CKPT", tasks=[...])``, or pass a ``MegatronLM`` instance as ``model``.

model_args: ``load`` (a Megatron checkpoint directory, any tensor/pipeline-parallel layout:
merged to one process here), ``device`` (cpu, cuda, cuda:N), ``batch_size`` (requests scored
per forward), ``dtype`` (float32, bfloat16, float16, or auto: the checkpoint's), ``vocab_file``,
``merge_file``, ``tokenizer_model`` (override the tokenizer paths stored in the checkpoint),
``iteration`` (default: the tracker's), ``max_length`` (default: the checkpoint's
--seq-length), ``max_gen_toks`` (256). One process; the model runs in eval mode (no dropout,
no token dropping).

Scoring (``_loglikelihood_tokens``): requests that share a context (the options of a
multiple-choice question) share one row: the context once, then each distinct continuation
(without its last token) as a branch that attends to the context and to itself only, at the
positions it would have alone (learned absolute positions; with rope every request keeps its
own row). Identical requests share a branch. Rows go longest first, right-padded (causal
attention: padding never reaches a real position), and the LM head and the fp32 log-softmax run
only at the continuation positions over the real vocabulary (padded vocabulary entries are not
tokens).
Generation (``generate_until``) is a batched loop (greedy, or sampled when ``do_sample``) that
stops at the stop sequences or the end-of-document token.
"""

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.utils import (Collator, handle_stop_sequences,  # noqa: E402
                                  normalize_gen_kwargs, postprocess_generated_text)
from tqdm import tqdm  # noqa: E402

from megatron.errors import UserError  # noqa: E402

MODEL_NAME = "megatron-ltd"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16}


def load_checkpoint_model(load, iteration=None):
    """(one-process GPTModel in eval mode, fp32, the checkpoint's args) of the Megatron
    checkpoint directory ``load``, saved with any tensor/pipeline-parallel layout (its shards
    merged by ``megatron.checkpoint_reshard.read_full_model_state``); ``iteration``: that one
    instead of the tracker's."""
    from megatron.checkpoint_reshard import model_state_for_rank, read_full_model_state
    from megatron.checkpointing import saved_model_config
    from megatron.model import GPTModel
    from megatron.model.module import load_flat_state
    from megatron.parallel.state import ParallelState
    from tools.generate_text import config_from_args

    full, args = read_full_model_state(load, iteration, flag="load=")
    if saved_model_config(args, load)[0] is None:  # refuses what this code cannot compute
        raise UserError(f"load={load}: the checkpoint's args describe no GPT model")
    model = GPTModel(config_from_args(args))
    state = model_state_for_rank(full, model, ParallelState())
    load_flat_state(model, {k: v.float() if v.is_floating_point() else v
                            for k, v in state.items()}, load)
    return model.eval(), args


def resolve_dtype(dtype, args):
    """torch dtype from the ``dtype`` model arg (``auto``: the checkpoint's parameters')."""
    if dtype == "auto":
        from megatron.arguments import params_torch_dtype

        return params_torch_dtype(args)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype}: expected one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def resolve_device(device):
    """The torch device; a CUDA device on a machine without one falls back to the CPU (lm-eval's
    command line asks for cuda:0 unless --device is given)."""
    device = str(device or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"megatron-ltd: device {device} is not available, using cpu", file=sys.stderr)
        return torch.device("cpu")
    return torch.device(device)


class _Row:
    """One model row: a prefix then branches; ``asks``: (request index, target ids, the row
    positions whose logits predict them)."""

    def __init__(self, prefix):
        self.prefix_length = len(prefix)
        self.tokens = list(prefix)
        self.positions = list(range(len(prefix)))
        self.segments = []  # (start, length) of each branch
        self.asks = []

    def add(self, branch, asks):
        """Append ``branch`` (at the positions that follow the prefix) for ``asks`` [(request
        index, target ids)]: the prefix's last position predicts each first target, the
        branch's tokens the rest."""
        start = len(self.tokens)
        self.tokens += branch
        self.positions += range(self.prefix_length, self.prefix_length + len(branch))
        self.segments.append((start, len(branch)))
        cols = [self.prefix_length - 1] + list(range(start, start + len(branch)))
        self.asks += [(index, target, cols) for index, target in asks]


class MegatronLM(TemplateLM):
    """lm-eval model over a Megatron GPT checkpoint (see the module docstring)."""

    def __init__(self, load=None, device="cpu", batch_size=1, dtype="float32", vocab_file=None,
                 merge_file=None, tokenizer_model=None, iteration=None, max_length=None,
                 max_gen_toks=256, max_batch_size=None, model=None, tokenizer=None, **unused):
        super().__init__()
        if unused:
            raise UserError(f"megatron-ltd: unknown model_args {', '.join(sorted(unused))}")
        if str(batch_size).startswith("auto"):
            raise UserError("megatron-ltd: batch_size=auto is not supported; give a number")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise UserError(f"megatron-ltd: batch_size must be positive, got {batch_size}")
        self._device = resolve_device(device)
        if model is None:  # from a checkpoint directory
            if load is None:
                raise UserError("megatron-ltd: model_args need load=CHECKPOINT_DIR")
            from tools.generate_text import build_tokenizer_from_args

            model, args = load_checkpoint_model(load, iteration)
            model = model.to(device=self._device, dtype=resolve_dtype(dtype, args))
            tokenizer = build_tokenizer_from_args(args, vocab_file, merge_file, tokenizer_model)
            max_length = max_length or getattr(args, "seq_length", None)
        self.model, self.megatron_tokenizer = model.eval(), tokenizer
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.vocab_size = tokenizer.vocab_size

    # -- what lm-eval asks of a model ---------------------------------------------------------

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """model_args win over the command line's defaults (which always pass ``device`` and
        ``batch_size``; lm-eval's base class would fail on a key given both ways)."""
        args = lm_utils.simple_parse_args_string(arg_string)
        for key, value in (additional_config or {}).items():
            if value is not None and key not in args:
                args[key] = value
        return cls(**args)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        return cls.create_from_arg_string("", {**(additional_config or {}), **arg_dict})

    @property
    def eot_token_id(self):
        return self.megatron_tokenizer.eod

    @property
    def max_length(self):
        return self._max_length

    @property
    def device(self):
        return self._device

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.megatron_tokenizer.tokenize(string)

    def tok_decode(self, tokens, **kwargs):
        return self.megatron_tokenizer.detokenize(list(tokens))

    # -- model calls --------------------------------------------------------------------------

    def _hidden(self, tokens):
        """Final-normed hidden states [b, s, h] of token rows [b, s] (causal, positions 0..)."""
        return self.model.language_model(tokens, self.model.default_position_ids(tokens))

    def _logits_at(self, hidden, rows, cols):
        """fp32 logits [n, V] over the real vocabulary at positions (rows[i], cols[i]): the
        output matrix's padding rows are left out of the product (one process, no tensor
        parallelism: the head is a plain matmul)."""
        picked = hidden[rows, cols]  # [n, h]
        weight = self.model.shared_embedding_or_output_weight()[:self.vocab_size]  # [V, h]
        return F.linear(picked, weight).float()

    def _pad(self, rows, length, value=None):
        """Int lists -> [b, length] long tensor, right-padded with ``value`` (the EOT id)."""
        value = self.eot_token_id if value is None else value
        batch = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        return batch.to(self.device)

    # -- loglikelihood --------------------------------------------------------------------------

    def _split(self, context_enc, continuation_enc):
        """(prefix, branch) of one request, left-truncated to ``max_length`` + 1 tokens as
        HFLM does: the model reads prefix + branch; the prefix's last position predicts the
        continuation's first token, the branch (continuation without its last token) the
        others."""
        if not continuation_enc or not context_enc:
            raise ValueError("loglikelihood requests need a context and a continuation")
        n = len(continuation_enc)
        if n > self.max_length:
            raise UserError(f"megatron-ltd: a continuation of {n} tokens is longer than "
                            f"max_length {self.max_length}")
        whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
        return tuple(whole[:len(whole) - n]), tuple(whole[len(whole) - n:-1])

    @property
    def _can_pack(self):
        """Several continuations share one row only with learned absolute positions (rope
        rotates by the index in the row, so a packed branch would sit at the wrong place)."""
        return self.model.config.position_embedding_type != "rope"

    def _rows(self, requests):
        """Model rows for ``requests`` [(key, context ids, continuation ids)], longest first.

        Requests with the same prefix (the options of a multiple-choice question) share one
        row: the prefix once, then each distinct branch, every branch attending to the prefix
        and to itself only, at the positions it would have alone. Requests with the same
        prefix and branch (duplicates, one-token options) share the branch too. A row holds
        at most ``2 * max_length`` tokens."""
        packs = {}
        for index, (_, context_enc, continuation_enc) in enumerate(requests):
            prefix, branch = self._split(context_enc, continuation_enc)
            key = (prefix,) if self._can_pack else (prefix, branch)
            packs.setdefault(key, {}).setdefault(branch, []).append(
                (index, list(continuation_enc)))
        rows = []
        for (prefix, *_), branches in packs.items():
            row = _Row(prefix)
            for branch, asks in branches.items():
                if row.segments and len(row.tokens) + len(branch) > 2 * self.max_length:
                    rows.append(row)
                    row = _Row(prefix)
                row.add(branch, asks)
            rows.append(row)
        return sorted(rows, key=lambda r: (-len(r.tokens), r.tokens))

    def _attention_mask(self, rows, length):
        """Boolean [b, 1, s, s] mask (True = masked) keeping each branch to the prefix and
        itself, or None when no row holds two branches (plain causal attention)."""
        if all(len(row.segments) < 2 for row in rows):
            return None
        segment = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            for k, (start, n) in enumerate(row.segments):
                segment[i, start:start + n] = k + 1
        segment = segment.to(self.device)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril_()
        keys, queries = segment[:, None, :], segment[:, :, None]
        allowed = causal & ((keys == 0) | (keys == queries))  # [b, s, s]
        return ~allowed[:, None]

    def _score_rows(self, rows):
        """Score one batch of ``_Row``s -> {request index: (sum of log-probabilities, every
        token greedy)}."""
        length = max(len(row.tokens) for row in rows)
        tokens = self._pad([row.tokens for row in rows], length)
        positions = self._pad([row.positions for row in rows], length, value=0)
        row_ids, col_ids, targets, owners = [], [], [], []
        for r, row in enumerate(rows):
            for index, target, cols in row.asks:
                row_ids += [r] * len(cols)
                col_ids += cols
                targets += target
                owners.append((index, len(cols)))
        with torch.inference_mode():
            hidden = self.model.language_model(tokens, positions,
                                               self._attention_mask(rows, length))
            logits = self._logits_at(hidden, torch.tensor(row_ids, device=self.device),
                                     torch.tensor(col_ids, device=self.device))
            target = torch.tensor(targets, device=self.device)
            logprobs = F.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
            greedy = logits.argmax(dim=-1) == target
        logprobs, greedy = logprobs.cpu().tolist(), greedy.cpu().tolist()
        out, start = {}, 0
        for index, n in owners:
            out[index] = (sum(logprobs[start:start + n]), all(greedy[start:start + n]))
            start += n
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        """[(cache key or None, context ids, continuation ids)] -> [(log-likelihood, greedy)],
        rows (``_rows``) scored ``batch_size`` at a time."""
        rows = self._rows(requests)
        batch_size = override_bs or self.batch_size
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="Running loglikelihood requests")
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            for index, answer in self._score_rows(batch).items():
                results[index] = answer
                key = requests[index][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(sum(len(row.asks) for row in batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Log-likelihood of whole texts: lm-eval's rolling windows of ``max_length`` tokens
        (the first conditioned on EOT), every token scored once; all windows of all requests
        batched together."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, target in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(string),
                                           prefix_token=self.eot_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------

    def _next_tokens(self, tokens, lengths, kwargs, generator):
        """The next token of every row of ``tokens`` [b, s] (rows end at ``lengths``)."""
        from megatron.text_generation import sample_next_token

        with torch.inference_mode():
            hidden = self._hidden(tokens[:, :int(lengths.max())])
            logits = self._logits_at(hidden, torch.arange(len(lengths), device=self.device),
                                     lengths - 1)
        if not kwargs.get("do_sample"):
            return logits.argmax(dim=-1)
        return sample_next_token(logits, top_k=int(kwargs.get("top_k", 0) or 0),
                                 top_p=float(kwargs.get("top_p", 0.0) or 0.0),
                                 temperature=float(kwargs.get("temperature", 1.0) or 1.0),
                                 generator=generator)

    def _generate(self, contexts, max_gen_toks, stop, kwargs):
        """Continuations (token lists) of ``contexts`` (token lists) until EOT, a stop string in
        the decoded text, or ``max_gen_toks`` tokens."""
        lengths = torch.tensor([len(c) for c in contexts], device=self.device)
        tokens = self._pad(contexts, int(lengths.max()) + max_gen_toks)
        done = torch.zeros(len(contexts), dtype=torch.bool, device=self.device)
        generator = None
        if kwargs.get("do_sample"):
            generator = torch.Generator(device=self.device).manual_seed(int(kwargs.get("seed", 0)))
        for _ in range(max_gen_toks):
            nxt = self._next_tokens(tokens, lengths, kwargs, generator)
            rows = (~done).nonzero(as_tuple=True)[0]
            tokens[rows, lengths[rows]] = nxt[rows]
            lengths[rows] += 1
            done[rows] |= nxt[rows] == self.eot_token_id
            for r in rows.tolist():
                text = self.tok_decode(tokens[r, len(contexts[r]):lengths[r]].tolist())
                done[r] |= any(s and s in text for s in stop)
            if bool(done.all()):
                break
        return [tokens[r, len(c):lengths[r]].tolist() for r, c in enumerate(contexts)]

    def generate_until(self, requests, disable_tqdm=False):
        """Continue each context until one of its ``until`` strings (or EOT); lm-eval's
        generation kwargs (``max_gen_toks``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``). Contexts keep their last ``max_length - max_gen_toks`` tokens."""
        batches = Collator([req.args for req in requests],
                           sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
                           group_by="gen_kwargs", group_fn=lambda x: x[1])
        eos = self.tok_decode([self.eot_token_id])
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="Running generate_until requests")
        for chunk in batches.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            stop = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            keep = self.max_length - max_gen_toks
            if keep < 1:
                raise UserError(f"megatron-ltd: max_gen_toks {max_gen_toks} leaves no room for a "
                                f"context in max_length {self.max_length}")
            encoded = [(self.tok_encode(c) or [self.eot_token_id])[-keep:] for c in contexts]
            for context, (prompt, gen_kwargs), cont in zip(
                    contexts, chunk, self._generate(encoded, max_gen_toks, stop, kwargs)):
                text = postprocess_generated_text(self.tok_decode(cont), stop, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (prompt, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return batches.get_original(results)


def register():
    """Register ``MegatronLM`` with lm-eval as ``megatron-ltd`` (once per process)."""
    from lm_eval.api.registry import model_registry

    if model_registry.get(MODEL_NAME, None) is not MegatronLM:
        register_model(MODEL_NAME)(MegatronLM)


def cli(argv=None):
    """lm-eval's command line with ``megatron-ltd`` registered (``argv``: its arguments)."""
    from lm_eval.__main__ import cli_evaluate

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    # Run as a script or with -m: register the importable module's class, not this copy's.
    from tasks.lm_eval_adapter import cli as _cli

    _cli()
else:
    register()
