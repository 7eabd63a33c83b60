"""Generation with a KV cache, with transformers' `generate` semantics, over any one-step decoder.

A *step* is a callable `step(input_ids, attention_mask, position_ids, past) -> (logits, present)`:
a captured decode graph (`LoraGraphModule.decode_step()`), or an ONNX Runtime session wrapped by
`export.generate`. `past` and `present` are whatever the step keeps its cache in (torch tensors,
ONNX Runtime values); this loop only hands them back. Token choice follows transformers: greedy, or
sampling after temperature, top-k and top-p, in that order; a row that emitted `eos_token_id` is
padded with `pad_token_id` afterwards; generation stops when every row has finished.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import ConfigError, InputsError

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (transformers' names and defaults)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.temperature, numbers.Real) or not self.temperature > 0:
            raise ConfigError(f"temperature must be a positive number, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k <= 0):
            raise ConfigError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, numbers.Real) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row from its last logits [batch, vocab]."""
    if not sampling.do_sample:
        return logits.argmax(-1)
    scores = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        k = min(sampling.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        # as transformers' TopPLogitsWarper: drop the low tail whose mass is at most 1 - top_p
        ordered, order = torch.sort(scores, descending=False)
        tail = ordered.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        tail[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(tail.scatter(-1, order, tail), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def max_positions(config) -> int | None:
    """How many positions a model has (its position table or its trained context), if it says."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _ModelDefault:
    """Default of an argument taken from the model's generation config, as transformers does (an
    explicit None means none)."""

    def __repr__(self) -> str:
        return "<the model's generation config>"


MODEL_DEFAULT = _ModelDefault()


def special_tokens(model, eos_token_id, pad_token_id):
    """eos / pad ids: as given, or (when left at MODEL_DEFAULT) the model's generation config's."""
    generation_config = getattr(model, "generation_config", None)
    if eos_token_id is MODEL_DEFAULT:
        eos_token_id = getattr(generation_config, "eos_token_id", None)
    if pad_token_id is MODEL_DEFAULT:
        pad_token_id = getattr(generation_config, "pad_token_id", None)
    return eos_token_id, pad_token_id


def check_request(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens,
                  max_positions: int | None) -> torch.Tensor:
    """The attention mask to use (ones when None), after checking the request; raises before any work."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InputsError(f"input_ids must be a [batch, sequence] tensor of token ids, got {getattr(input_ids, 'shape', input_ids)!r}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise InputsError(f"input_ids must hold integer token ids, got {input_ids.dtype}: pass the tokenizer's ids "
                          "(torch.long), e.g. input_ids.long() if they were converted")
    if input_ids.shape[1] == 0:
        raise InputsError("input_ids is empty: give at least one prompt token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if max_positions is not None:
        total = input_ids.shape[1] + max_new_tokens
        if input_ids.shape[1] > max_positions:
            raise InputsError(f"the prompt has {input_ids.shape[1]} tokens but the model has {max_positions} positions; "
                              "shorten the prompt")
        if total > max_positions:
            raise InputsError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} tokens, more "
                              f"than the model's {max_positions} positions; lower max_new_tokens to at most "
                              f"{max_positions - input_ids.shape[1]}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise InputsError(f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    return attention_mask.to(input_ids.device, torch.long)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded prompt, as transformers makes them (padding gets position 1)."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def generate_with(step: Step, input_ids: torch.Tensor, past: Any, *, max_new_tokens: int,
                  attention_mask: torch.Tensor | None = None, eos_token_id=None, pad_token_id: int | None = None,
                  sampling: Sampling = Sampling(), max_positions: int | None = None) -> torch.Tensor:
    """Prompt and new tokens [batch, prompt + new] (fewer new tokens when every row ended with eos)."""
    mask = check_request(input_ids, attention_mask, max_new_tokens, max_positions)
    eos = None if eos_token_id is None else torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)
    if eos is not None and pad_token_id is None:
        pad_token_id = int(eos[0])  # as transformers does when no pad token is set
    generator = None
    if sampling.do_sample and sampling.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(sampling.seed)
    tokens, pos, ids = input_ids, positions(mask), input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits, past = step(ids, mask, pos, past)
        nxt = pick(logits[:, -1, :], sampling, generator)
        if eos is not None:
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
            unfinished &= ~torch.isin(nxt, eos)
        ids = nxt[:, None].to(input_ids.dtype)
        tokens = torch.cat([tokens, ids], dim=1)
        if eos is not None and not unfinished.any():
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos[:, -1:] + 1
    return tokens
