"""Batches that mix adapters: row i of one forward uses adapter k_i (or none).

`mixed_adapters(gm, names)` returns an inference graph with one more input, `adapter_index` (one int
per row: a position in `names`, or -1 for the base model). Every adapted product gets a branch that
gathers each row's A, B and scaling from banks of all the adapters (row 0 of each bank is the zero
adapter, adapter j is row j + 1) and applies them with batched matmuls; adapters of smaller rank are
zero-padded to the largest (exact). It exports to ONNX like any other graph, so ONNX Runtime serves
mixed batches too.
"""
from __future__ import annotations

import inspect
from functools import partial

import torch
from torch import nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from . import slot
from .attach import base_copy
from .errors import ConfigError, InputsError
from .graph_module import CaptureInfo, LoraGraphModule, require_lora
from .match import rematch, x_position
from .paths import set_module
from .rewrite import LORA_META
from .state import Site

INDEX = "adapter_index"
MIXED = "lora_mixed"  # the MixedLora module of a site: <holder>.lora_mixed


def bank_name(slot_free: str) -> str | None:
    """The bank buffer that holds a served adapter's weight or scaling (by its slot-free name,
    `<holder>.lora_A[.block<i>].weight` or `<holder>.lora_scaling`), or None for another name."""
    parsed = slot.parse_slot_free(slot_free)
    if parsed is not None:
        which = "A" if parsed.which == slot.LORA_A else "B"
        return f"{parsed.holder}.{MIXED}.{which}{'' if parsed.block is None else parsed.block}"
    holder = slot.scale_holder(slot_free)
    return None if holder is None else f"{holder}.{MIXED}.scale"


def bank_source(bank: str) -> str | None:
    """The slot-free name of what a bank buffer holds (the inverse of `bank_name`), or None for a
    name that is not a bank."""
    owner, _, leaf = bank.rpartition(".")
    holder, _, module = owner.rpartition(".")
    if module != MIXED or not holder:
        return None
    if leaf == "scale":
        return slot.scale_slot_free(holder)
    if leaf[:1] in ("A", "B") and (leaf[1:] == "" or leaf[1:].isdigit()):
        which = slot.LORA_A if leaf[0] == "A" else slot.LORA_B
        return slot.LoraName(holder, which, None, int(leaf[1:]) if leaf[1:] else None).slot_free
    return None


class MixedLora(nn.Module):
    """base + per-row LoRA update, for one adapted product; banks hold a zero adapter (row 0) and then
    every adapter. `bank_rows` is the row of each batch row's adapter (its index + 1). Bank buffers
    are named as `bank_name` maps an adapter's weights to them: `A` / `B` for a whole weight, `A<i>` / `B<i>` for block i of a fused projection, and `scale`."""

    def __init__(self, site: Site, banks_a: list[torch.Tensor], banks_b: list[torch.Tensor], scale: torch.Tensor):
        super().__init__()
        self.out_features, self.fused = site.out_features, site.fused
        self.lookup = site.kind == "embedding"  # x holds token ids: rows of A.T are looked up
        self.blocks = [(str(b.index) if site.fused else "", b.start, b.stop) for b in site.blocks]
        for (i, _, _), a, b in zip(self.blocks, banks_a, banks_b):
            self.register_buffer(f"A{i}", a)  # [adapters + 1, rank, in]
            self.register_buffer(f"B{i}", b)  # [adapters + 1, rows, rank]
        self.register_buffer("scale", scale)  # [adapters + 1, rank]

    def forward(self, x, bank_rows, base):
        rows = bank_rows.shape[0]
        xb = x if self.lookup else x.reshape(rows, -1, x.shape[-1])

        def gather(bank):  # index_select: one ONNX Gather that reads the rows' adapters only, never the bank
            return torch.index_select(bank, 0, bank_rows)

        scale = gather(self.scale).unsqueeze(1)
        total = None
        if self.lookup:
            ids = x.reshape(rows, -1)
        for i, start, stop in self.blocks:
            if self.lookup:  # row r, token t: A.T[ids[r, t]] of row r's adapter
                a_t = gather(getattr(self, f"A{i}")).transpose(1, 2)
                a = a_t[torch.arange(rows, device=ids.device).unsqueeze(1), ids] * scale
            else:
                a = torch.bmm(xb, gather(getattr(self, f"A{i}")).transpose(1, 2)) * scale
            d = torch.bmm(a, gather(getattr(self, f"B{i}")).transpose(1, 2))
            if self.fused:
                d = torch.nn.functional.pad(d, (start, self.out_features - stop))
            total = d if total is None else total + d
        return base + total.reshape(base.shape)


def check_index(inputs: dict, banks: int, names: list[str]) -> None:
    """adapter_index of a call: one integer per row, each a bank (0 .. banks - 1) or -1 (none). The
    graph reads bank row index + 1 (row 0 is the zero bank): any other value would serve another
    row's adapter or none (ONNX's Gather counts negative indices from the end). Tensors being traced (fake, meta) are not read."""
    index = inputs.get(INDEX)
    if type(index) is not torch.Tensor or index.is_meta:
        return
    batch = next((v.shape[0] for k, v in inputs.items() if k != INDEX and isinstance(v, torch.Tensor) and v.dim()), None)
    what = f"one of {names} by position" if names else f"a bank 0..{banks - 1}"
    if index.is_floating_point() or index.dtype == torch.bool or index.dim() != 1 or (batch is not None and
                                                                                      index.shape[0] != batch):
        raise InputsError(f"adapter_index must be an integer tensor with one entry per row ({batch} rows), got "
                          f"{index.dtype} of shape {tuple(index.shape)}: row i's entry is {what}, or -1 for none")
    bad = index[(index < -1) | (index >= banks)]
    if bad.numel():
        raise InputsError(f"adapter_index {int(bad[0])} is out of range: each row's entry is {what}, or -1 for none "
                          f"({banks} banks)")


def mixed_adapters(gm: LoraGraphModule, names: list[str] | int) -> LoraGraphModule:
    """An inference graph serving `names` in one batch, chosen per row by the `adapter_index` input
    (a position in `names`, or -1 for none). An int k gives k empty banks, each sized to the graph's
    slots, for a server to fill per request. Works on a forward or on a decoding step
    (`gm.decode_step()`)."""
    state = require_lora(gm, "mixed_adapters")
    slots = names if isinstance(names, int) and not isinstance(names, bool) else None
    names = [] if slots is not None else list(names)
    if not names and not (slots and slots > 0):
        raise ConfigError(f"name the adapters to mix, e.g. {sorted(state.adapters)}, or give a number of empty banks")
    state.check_names(names, f"cannot mix adapters {names}")
    cap = gm.capture_info
    if cap is None or cap.positional or cap.example_inputs is None:
        raise ConfigError("mixed_adapters needs a graph captured with keyword inputs")
    biased = [n for n in names if state.adapters[n].config.lora_bias]
    if biased or (slots and state.bias_sites()):
        raise ConfigError(f"mixed batches serve lora_A / lora_B banks; {biased or sorted(state.bias_sites())[:1]} have a "
                          "lora_B bias (lora_bias). Serve them folded (merge_lora)")
    dora = [n for n in names if state.adapters[n].config.use_dora]
    if dora or (slots and state.dora_sites()):
        raise ConfigError(f"mixed batches sum per-row LoRA updates; DoRA adapters ({dora or sorted(state.dora_sites())[:1]}) "
                          "rescale the weight instead. Serve a DoRA adapter folded (merge_lora)")
    weights = {n: slot.read(gm, state, n) for n in names}

    mixed = base_copy(gm)
    graph = mixed.graph
    sites = list(state.sites.values())
    matches = rematch(mixed, sites)
    refused = [m.site.param for m in matches for u in m.uses if u.kind not in ("linear", "addmm", "matmul", "embedding")]
    if refused:
        raise ConfigError(f"mixed batches need every adapted weight to be used in a product with an activation or "
                          f"an embedding lookup; {refused[0]} is not (a convolution, an expert stack, or a weight "
                          "adapted as W + scaling*B@A). Serve one adapter per session, or fold")

    placeholders = graph.find_nodes(op="placeholder")
    with graph.inserting_after(placeholders[-1]):
        index = graph.placeholder(INDEX)
    k = (slots or len(names)) + 1  # banks, and the zero one first
    with graph.inserting_after(index):  # -1 (no adapter) selects the zero bank, row 0
        selected = graph.call_function(torch.add, (index, 1))
    x_at = {id(u): x_position(u) for m in matches for u in m.uses}
    for m in matches:
        site = m.site
        rank = slot.rank_of(gm, site, state.slot) if slots else max([state.adapters[n].ranks.get(site.param, 0) for n in names] + [1])
        banks_a = [torch.zeros(k, rank, site.in_features) for _ in site.blocks]
        banks_b = [torch.zeros(k, b.stop - b.start, rank) for b in site.blocks]
        scale = torch.zeros(k, rank)
        for j, name in enumerate(names):
            adapter = state.adapters[name]
            if site.param not in adapter.ranks:
                continue
            r = adapter.ranks[site.param]
            for i, (a, b) in enumerate(weights[name][site.param]):
                banks_a[i][j + 1, :r], banks_b[i][j + 1, :, :r] = a, b
            scale[j + 1, :r] = adapter.scaling(site.param)
        like = gm.get_parameter(site.param)
        to = {"dtype": like.dtype, "device": like.device}  # (a quantized weight's logical dtype)
        module = MixedLora(site, [t.to(**to) for t in banks_a], [t.to(**to) for t in banks_b], scale.to(**to))
        path = f"{site.holder}.{MIXED}" if site.holder else MIXED
        set_module(mixed, path, module)
        for use in m.uses:
            with graph.inserting_after(use.node):
                reads, at = x_at[id(use)]
                out = graph.call_module(path, (reads.args[at], selected, use.node))
            out.meta[LORA_META] = {"param": site.param, "role": "mixed"}
            use.node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
    graph.lint()

    example = dict(cap.example_inputs)
    batch = next(v for v in example.values() if isinstance(v, torch.Tensor)).shape[0]
    example[INDEX] = torch.zeros(batch, dtype=torch.long)
    orig = graph._codegen.pytree_info
    in_spec = pytree.tree_flatten(((), example))[1]
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(list(orig.orig_args) + [INDEX], in_spec, orig.out_spec))
    mixed._in_spec = in_spec
    signature = cap.signature.replace(parameters=[
        *[p for p in cap.signature.parameters.values() if p.kind is not p.VAR_KEYWORD],
        inspect.Parameter(INDEX, inspect.Parameter.KEYWORD_ONLY),
    ])
    mixed.lora_state = None
    # the source is kept for what its config says (positions, special tokens); this graph cannot be
    # captured again (recapture None): the banks are its own
    mixed.capture_info = CaptureInfo(source=cap.source, signature=signature, input_names=(*cap.input_names, INDEX),
                                     example_inputs=example, notes=[f"mixed adapters: {names or slots}"],
                                     kind=cap.kind, check_inputs=partial(check_index, banks=k - 1, names=list(names)))
    mixed.recompile()
    mixed.eval()
    return mixed
