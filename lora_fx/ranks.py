"""Every rank of a process group must hold the same graph: a rank that captured other inputs or put
LoRA on other weights would otherwise hang (or garble) the first collective of a sharded step."""
from __future__ import annotations

import hashlib

import torch

from .errors import TargetError


def check_ranks(gm: torch.fx.GraphModule) -> None:
    """In a process group, check that every rank holds the same graph (the same code, targets and
    ranks of every adapter); a TargetError on every rank if not. A collective: every rank must call
    it (`unflatten` does, and a flat graph sharded at its root does at its first call)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    state = getattr(gm, "lora_state", None)
    sites = sorted((p, a.ranks.get(p)) for a in state.adapters.values() for p in a.ranks) if state else []
    mine = hashlib.sha256((gm.code + repr(sites)).encode()).hexdigest()
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    differ = [r for r, h in enumerate(everyone) if h != everyone[0]]
    if differ:
        raise TargetError(f"ranks {differ} hold another graph than rank 0 (other example inputs, targets or ranks "
                          "given to inject_lora on those ranks?); every rank must capture and inject the same way")
