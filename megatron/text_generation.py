"""Autoregressive sampling from a GPTModel: greedy, top-k, top-p (nucleus), temperature.

Correctness first: every step re-runs the model on the (cropped) context, no KV cache. The
model runs in eval mode (no dropout, no token dropping) under ``torch.no_grad``; its previous
mode is restored afterwards.
"""

from typing import List, Optional, Union

import torch

from megatron.parallel.mappings import gather_from_tp_region


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit of ``logits [b, V]`` outside the top-k and the top-p nucleus.

    top_k == 0 and top_p == 0.0 disable the filters. The nucleus is the smallest set of most
    likely tokens whose probability reaches top_p (the token crossing the threshold is kept).
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    logits = logits.clone()
    if top_k > 0:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [b, 1]
        logits.masked_fill_(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [b, V]
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [b, V]
        # Drop a token when the tokens before it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits.masked_fill_(drop, float("-inf"))
    return logits


def sample_next_token(logits: torch.Tensor, *, greedy: bool = False, top_k: int = 0,
                      top_p: float = 0.0, temperature: float = 1.0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick one token per row of ``logits [b, V]`` -> [b]."""
    if greedy:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)  # [b, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model, prompt_ids: Union[List[int], torch.Tensor], max_new_tokens: int, *,
             greedy: bool = False, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
             eod: Optional[int] = None, generator: Optional[torch.Generator] = None,
             vocab_size: Optional[int] = None) -> Union[List[int], torch.Tensor]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens.

    ``prompt_ids``: a list of ids (returns a list: prompt + continuation, ending at the first
    generated ``eod`` when given) or a [b, s] tensor (returns [b, s + n]; rows that produced
    ``eod`` are padded with ``eod`` until every row has, then generation stops).
    ``vocab_size``: real vocabulary size; padded vocabulary entries are never sampled.
    The context fed to the model is cropped to the last ``max_position_embeddings`` tokens.
    """
    as_list = not torch.is_tensor(prompt_ids)
    device = next(model.parameters()).device
    tokens = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if as_list:
        tokens = tokens.view(1, -1)  # [1, s]
    if tokens.dim() != 2 or tokens.size(1) == 0:
        raise ValueError("prompt_ids must be a non-empty list or a [b, s] tensor")
    window = model.config.max_position_embeddings
    parallel = getattr(model, "parallel", None)
    done = torch.zeros(tokens.size(0), dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                context = tokens[:, -window:]  # [b, <= window]
                logits = model(context)[:, -1, :]  # [b, V/tp]
                if parallel is not None:
                    logits = gather_from_tp_region(logits, parallel)  # [b, V]
                if vocab_size is not None:
                    logits[:, vocab_size:] = float("-inf")
                nxt = sample_next_token(logits, greedy=greedy, top_k=top_k, top_p=top_p,
                                        temperature=temperature, generator=generator)  # [b]
                if eod is not None:
                    nxt = nxt.masked_fill(done, eod)
                    done |= nxt == eod
                tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)  # [b, s + 1]
                if eod is not None and bool(done.all()):
                    break
    finally:
        model.train(was_training)

    return tokens[0].tolist() if as_list else tokens
