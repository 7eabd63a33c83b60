"""Adapters as files, in PEFT's format: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's (`base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained` loads
what `save_adapter` writes and `load_adapter` reads what PEFT's `save_pretrained` writes. Only
safetensors is read: a pickle file is never opened. Everything is validated before anything changes.
Writes go to temporary files that replace the old ones only once complete.

`AdapterFile` is one adapter as PEFT stores it, read from a folder (`read_adapter`) or taken from a
graph module (`adapter_file`): what saving writes and what serving exports.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import slot
from .adapters import trainable_weights
from .attach import attach_adapter, base_copy, graph_to_adapt, inject_matched, new_adapter, pattern_key, pattern_value
from .errors import AdapterFileError, CaptureError, ConfigError, TargetError
from .graph_module import LoraGraphModule, regions_of, require_lora, unfolded_lora
from .match import match_weights, output_layer, parse_targets, resolve_targets
from .peft_rules import selection
from .inject import CAPTURES
from .inits import apply_residual_init, is_residual
from .loftq import BITS, LoftQConfig, apply_loftq, check_loftq
from .regions import each_region, global_site, inject_regions, join, region_specs
from .state import Adapter, LoraConfig, Site, Weights

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt", "pytorch_model.bin")
MAX_CONFIG_BYTES = 1 << 20

# adapter_config.json fields lora-fx reads, and fields that are harmless metadata
USED = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern",
        "modules_to_save", "use_rslora", "lora_fx_blocks", "init_lora_weights", "target_parameters", "use_dora",
        "lora_bias", "lora_fx_grouped_convs", "lora_fx_dropout", "lora_fx_only", "loftq_config",
        "exclude_modules", "layers_to_transform", "layers_pattern"}
IGNORED = {"task_type", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping", "peft_version",
           "fan_in_fan_out", "eva_config", "corda_config", "megatron_core", "ensure_weight_tying",
           "qalora_group_size", "lora_ga_config"}
# fields that change the adapter's math: accepted only at their neutral value; a PEFT variant
# lora-fx does not implement is refused by the field that turns it on
NEUTRAL = {"bias": "none", "use_qalora": False,
           "trainable_token_indices": None, "layer_replication": None, "alora_invocation_tokens": None,
           "arrow_config": None, "megatron_config": None, "use_bdlora": None, "kasa_config": None,
           "velora_config": None, "monteclora_config": None}
VARIANTS = {"kasa_config": "KaSA", "velora_config": "VeLoRA",
            "monteclora_config": "MonteCLoRA", "use_bdlora": "BD-LoRA", "trainable_token_indices": "trainable tokens",
            "use_qalora": "QA-LoRA", "arrow_config": "Arrow", "alora_invocation_tokens": "aLoRA"}
# init_lora_weights values that make a variant, not only an initialisation (MiCA freezes lora_B)
VARIANT_INITS = {"mica": "MiCA (trains lora_A only)"}


@dataclass
class AdapterFile:
    """One adapter as PEFT stores it."""

    config: dict  # adapter_config.json's fields (validated when read from disk)
    lora: dict[slot.LoraName, torch.Tensor]  # LoRA weights, by name (no slot)
    modules: dict[str, torch.Tensor]  # fully trained modules' weights (modules_to_save), by parameter name
    scalings: dict[str, float]  # holder module -> the scaling its update is multiplied by
    # PEFT's copies of adapted embedding layers' base weights (save_embedding_layers), by parameter name
    base: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What adapter_model.safetensors holds: everything under PEFT's keys."""
        out = {slot.FILE_PREFIX + name.slot_free: t for name, t in self.lora.items()}
        out.update({slot.FILE_PREFIX + k: t for k, t in self.modules.items()})
        return out

    def targets(self):
        """The `targets` to match: the config's, with fused-block specs where lora-fx saved some
        (None when the adapter targets parameters only)."""
        targets = self.config["target_modules"] or None
        if not self.config.get("lora_fx_blocks"):
            return targets
        spec = {t: True for t in ([targets] if isinstance(targets, str) else targets)}
        spec.update(self.config["lora_fx_blocks"])
        return spec


# ---------------------------------------------------------------------------------------------- save
def adapter_file(gm: LoraGraphModule, name: str | None = None, as_lora: bool = False,
                 portable: bool = False) -> AdapterFile:
    """Adapter `name` (default: the active one) of `gm`, as PEFT would store it (of a regionally
    captured model: every region's LoRA under its path). `as_lora`: a PiSSA / OLoRA adapter as PEFT's
    conversion makes it (path_initial_model_for_weight_conversion), a plain rank-2r LoRA on the
    untouched W0: [A; A0] and [B, -B0], alpha doubled (sqrt(2)x with rsLoRA), the same scaling.
    `portable`: one rank and scaling 1 everywhere (see `_portable`), for readers that ignore
    rank_pattern / alpha_pattern / use_rslora."""
    if regions_of(gm) is not None:
        if as_lora or portable:
            raise ConfigError(f"{'as_lora' if as_lora else 'portable'} is not supported on a regionally captured model; "
                              "save the adapter without it")
        return _regional_file(gm, name)
    state = require_lora(gm, "adapter_file")
    adapter = state.adapter(name)
    lora, scalings = {}, {}
    weights = slot.read(gm, state, adapter.name)
    if as_lora or (portable and adapter.initial is not None):  # portable: relative to the untouched W0
        adapter, weights = _as_plain_lora(adapter, weights)
    bias_scale = {p: adapter.scaling(p) if portable else 1.0 for p in weights}  # PEFT scales lora_B's bias too
    if portable:
        adapter, weights = _portable(adapter, weights, state.sites)
    magnitudes = slot.read_magnitudes(gm, state, adapter.name) or {}
    biases = {p: b * bias_scale[p] for p, b in (slot.read_biases(gm, state, adapter.name) or {}).items()}
    holders = slot.file_holders([state.sites[p] for p in weights])
    for param, pairs in weights.items():
        site = state.sites[param]
        if site.peft_target == "parameter" and not site.by_parameter and site.layout == "in_out":
            # PEFT reads a parameter target as [out, in] (rows out): an [in, out] weight's update (B @ A)^T
            # is B' @ A' with A' = B^T, B' = A^T, exactly
            pairs = [(b.t(), a.t()) for a, b in pairs]
        for block, (a, b) in zip(site.blocks, pairs):
            lora[slot.file_name(site, holders[param], slot.LORA_A, block.index)] = slot.to_file(site, slot.LORA_A, a)
            lora[slot.file_name(site, holders[param], slot.LORA_B, block.index)] = slot.to_file(site, slot.LORA_B, b)
        if param in magnitudes:
            lora[slot.LoraName(holders[param], slot.LORA_M, None, None)] = slot.to_file(site, slot.LORA_M, magnitudes[param])
        if param in biases:
            lora[slot.LoraName(holders[param], slot.LORA_BIAS, None, None)] = biases[param]
        scalings[holders[param]] = adapter.scaling(param)
    config = config_for([state.sites[p] for p in adapter.ranks], adapter, state.trainable_modules,
                        gm.capture_info.source if gm.capture_info else None)
    return AdapterFile(config, lora, dict(trainable_weights(gm)), scalings)


def _as_plain_lora(adapter: Adapter, weights: Weights) -> tuple[Adapter, Weights]:
    """PEFT's conversion of a PiSSA / OLoRA adapter to a LoRA on W0: ΔW = s·B·A - s·B0·A0 at rank 2r."""
    if adapter.initial is None:
        raise ConfigError(f"as_lora converts a PiSSA / OLoRA adapter to a plain LoRA; adapter {adapter.name!r} "
                          f"(init {adapter.config.init!r}) is a plain LoRA already: save it without as_lora")
    pairs = {p: [(torch.cat([a, a0.to(a)], 0), torch.cat([b, -b0.to(b)], 1))
                 for (a, b), (a0, b0) in zip(weights[p], adapter.initial[p])] for p in weights}
    factor = 2 ** 0.5 if adapter.config.use_rslora else 2
    return replace(adapter, config=replace(adapter.config, init="kaiming"), ranks={p: 2 * r for p, r in adapter.ranks.items()},
                   alphas={p: factor * a for p, a in adapter.alphas.items()}, initial=None), pairs


def _portable(adapter: Adapter, weights: Weights, sites: dict[str, Site]) -> tuple[Adapter, Weights]:
    """The same update with one rank (the largest; smaller ones zero-padded, exact), alpha = rank
    (scaling 1) and no rsLoRA: each site's scaling is multiplied into lora_B. vLLM ignores
    rank_pattern / alpha_pattern, so a mixed-rank adapter is served there with the wrong scaling;
    this one reads the same in every consumer. (DoRA's magnitude sees s·B·A only: unchanged; a
    lora_bias is scaled like B, in `adapter_file`.)"""
    config = adapter.config
    if config.loftq_iterations:
        raise ConfigError(f"portable writes an update relative to the model's weights; adapter {adapter.name!r} is LoftQ's, "
                          "relative to LoftQ's base. Save it without portable, or fold it (merge_lora)")
    rank = max(adapter.ranks.values())
    out = {}
    for param, pairs in weights.items():
        site, s = sites[param], adapter.scaling(param)
        dim_a, dim_b = site.rank_dims
        pad = rank - adapter.ranks[param]
        out[param] = [(torch.cat([a, a.new_zeros(*a.shape[:dim_a], pad, *a.shape[dim_a + 1:])], dim_a),
                       torch.cat([b * s, b.new_zeros(*b.shape[:dim_b], pad, *b.shape[dim_b + 1:])], dim_b))
                      for a, b in pairs]
    flat = replace(config, rank=rank, alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False)
    return replace(adapter, config=flat, ranks={p: rank for p in adapter.ranks},
                   alphas={p: float(rank) for p in adapter.alphas}), out


def _regional_file(gm: nn.Module, name: str | None) -> AdapterFile:
    regions = regions_of(gm)
    lora, scalings, sites, ranks, alphas, config = {}, {}, [], {}, {}, None
    for path, graph in each_region(gm):
        state = require_lora(graph, "adapter_file")
        adapter = state.adapter(name)
        part = adapter_file(graph, adapter.name)
        lora.update({replace(n, holder=join(path, n.holder)): t for n, t in part.lora.items()})
        scalings.update({join(path, h): s for h, s in part.scalings.items()})
        for param in adapter.ranks:
            site = global_site(state.sites[param], path)
            sites.append(site)
            ranks[site.param], alphas[site.param] = adapter.ranks[param], adapter.alphas[param]
        config = adapter.config
    merged = Adapter(name or "", config, ranks, alphas, None)
    return AdapterFile(config_for(sites, merged, regions.trainable, regions.source), lora, dict(trainable_weights(gm)),
                       scalings)


def file_sites(gm: nn.Module, name: str | None) -> list[Site]:
    """The sites adapter `name` adapts, with the model's paths (a region's are prefixed with its path)."""
    if regions_of(gm) is not None:
        return [global_site(g.lora_state.sites[p], path) for path, g in each_region(gm)
                for p in require_lora(g, "save_adapter").adapter(name).ranks]
    state = require_lora(gm, "save_adapter")
    return [state.sites[p] for p in state.adapter(name).ranks]


def save_adapter(gm: LoraGraphModule, directory, name: str | None = None, *, lora_fx_only: bool = False,
                 as_lora: bool = False, portable: bool = False) -> Path:
    """Write adapter `name` (default: the active one) of `gm` as PEFT's adapter folder. In a process
    group (FSDP2), every rank calls it: LoRA's shards are gathered, and rank 0 writes.
    A PiSSA / OLoRA adapter is saved as PEFT saves it (init_lora_weights names the init, and PEFT
    rebuilds the residual on load); `as_lora=True` writes PEFT's conversion instead, a plain rank-2r
    LoRA any PEFT user loads on the untouched base (see `adapter_file`). `portable=True`: one rank,
    alpha = rank, no rsLoRA, each site's scaling in lora_B (exact), so that readers that ignore
    rank_pattern / alpha_pattern (vLLM) or know no rsLoRA serve the same update.
    An adapter PEFT could not load is refused with the reason, unless `lora_fx_only`: then it is
    written in PEFT's layout for lora-fx to read (its config says `"lora_fx_only": true`)."""
    from safetensors.torch import save_file  # optional dependency (the `hf` extra)

    file = adapter_file(gm, name, as_lora, portable)
    why = peft_refusal(file_sites(gm, name), file.config)
    if why is not None and not lora_fx_only:
        raise ConfigError(f"PEFT could not load this adapter: {why}. Leave that weight out of the adapter's targets, or "
                          "save_adapter(..., lora_fx_only=True) for a folder only lora-fx reads")
    if why is not None:
        file.config["lora_fx_only"] = True
    directory = Path(directory)
    if not directory.parent.is_dir():
        raise AdapterFileError(f"cannot save to {directory}: its parent {directory.parent} does not exist; create it first")
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(f"cannot save to {directory}: it is a file, not a directory")
    config_bytes = (json.dumps(file.config, indent=2, sort_keys=True) + "\n").encode()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in file.tensors().items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return directory  # a sharded model: every rank gathered LoRA (above), rank 0 writes
    metadata = {"format": "pt", "lora_fx_config": fingerprint(file.config)}
    try:
        directory.mkdir(exist_ok=True)
        weights_tmp = _tmp(directory, WEIGHTS)
        save_file(tensors, weights_tmp, metadata=metadata)
        config_tmp = _tmp(directory, CONFIG)
        Path(config_tmp).write_bytes(config_bytes)
        for tmp in (weights_tmp, config_tmp):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        # weights first: a crash between the two renames is caught at load by the checksum
        os.replace(weights_tmp, directory / WEIGHTS)
        os.replace(config_tmp, directory / CONFIG)
    except PermissionError as e:
        raise AdapterFileError(f"cannot write the adapter to {directory}: {e.strerror}; choose a writable directory") from None
    finally:
        for leftover in directory.glob(".lora-fx-tmp-*") if directory.is_dir() else []:
            leftover.unlink(missing_ok=True)
    return directory


def fingerprint(config: dict) -> str:
    """A hash of the config fields that must agree with the weights (not of the bytes: editing
    base_model_name_or_path by hand is fine)."""
    keys = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "modules_to_save", "use_rslora",
            "lora_fx_blocks", "target_parameters", "use_dora", "lora_bias")
    return hashlib.sha256(json.dumps({k: config.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()


def _tmp(directory: Path, name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f".lora-fx-tmp-{name}-", dir=directory)
    os.close(fd)
    return path


def peft_config(gm: LoraGraphModule, name: str) -> dict:
    """The adapter_config.json PEFT expects for adapter `name`."""
    state = require_lora(gm, "peft_config")
    adapter = state.adapter(name)
    return config_for([state.sites[p] for p in adapter.ranks], adapter, state.trainable_modules,
                      gm.capture_info.source if gm.capture_info else None)


def config_for(sites: list[Site], adapter: Adapter, trainable: list[str], source: nn.Module | None) -> dict:
    """The adapter_config.json PEFT expects for `adapter` over `sites` (paths as the model spells them)."""
    r = max(set(adapter.ranks.values()), key=list(adapter.ranks.values()).count)
    alpha = max(set(adapter.alphas.values()), key=list(adapter.alphas.values()).count)
    modules = [s for s in sites if not s.file_param]
    parameters = [s for s in sites if s.file_param]
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": adapter.config.dropout,
        "target_modules": sorted({s.owner for s in modules}),
        "target_parameters": [s.param for s in parameters] or None,
        # keyed as PEFT matches them: module paths, and parameter paths for parameter targets
        "rank_pattern": {re.escape(s.param if s.file_param else s.owner): adapter.ranks[s.param] for s in sites
                         if adapter.ranks[s.param] != r},
        "alpha_pattern": {re.escape(s.param if s.file_param else s.owner): adapter.alphas[s.param] for s in sites
                          if adapter.alphas[s.param] != alpha},
        "modules_to_save": list(trainable) or None,
        "fan_in_fan_out": any(s.kind == "linear" and not s.file_param and s.layout == "in_out" for s in sites),
        # PEFT loads a lora_bias adapter only with init_lora_weights True or False (the init is spent anyway)
        "init_lora_weights": "gaussian" if adapter.config.init == "gaussian" and not adapter.config.lora_bias else
                             adapter.config.init if is_residual(adapter.config.init) else True,
        "bias": "none", "use_rslora": adapter.config.use_rslora, "use_dora": adapter.config.use_dora,
        "lora_bias": adapter.config.lora_bias,
        "base_model_name_or_path": getattr(getattr(source, "config", None), "_name_or_path", None) or None,
        # the targets above are the adapted modules' paths, which PEFT matches exactly (no layer filter),
        # so these only record what selected them
        "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, **adapter.config.selection,
    }
    if adapter.config.loftq_iterations:
        # as PEFT's own LoftQ example saves: init_lora_weights=True ("don't apply LoftQ when loading
        # again": PEFT would re-run it, on CUDA with bitsandbytes) and the loftq_config it used, which
        # PEFT then ignores and lora-fx reads as "this adapter sits on a LoftQ base"
        bits = {BITS[s.quantized] for s in sites if s.quantized in BITS}
        config["init_lora_weights"] = True
        config["loftq_config"] = {"loftq_bits": max(bits), "loftq_iter": adapter.config.loftq_iterations}
    if parameters and adapter.config.dropout:
        # PEFT's parameter targets refuse lora_dropout; it acts only in training, so the file says 0 for
        # PEFT and keeps the trained value for lora-fx
        config["lora_dropout"], config["lora_fx_dropout"] = 0.0, adapter.config.dropout
    blocks = {s.owner: _block_spec(s) for s in sites if s.fused}
    if blocks:  # not representable in PEFT: only lora-fx reads these adapters
        config["lora_fx_blocks"] = blocks
    grouped = sorted(s.owner for s in sites if s.groups > 1)
    if grouped:  # an update of the grouped weight: PEFT's grouped-conv LoRA is another function
        config["lora_fx_grouped_convs"] = grouped
    return config


def peft_refusal(sites: list[Site], config: dict) -> str | None:
    """Why PEFT cannot load an adapter over `sites` written with `config`, or None. PEFT wraps
    modules it knows (nn.Linear, Conv1D, nn.Embedding, nn.ConvNd, nn.MultiheadAttention) and reaches
    other weights only as parameter targets, while their own module's forward runs (its ParamWrapper:
    matrices and expert stacks, no fan_in_fan_out)."""
    for s in sites:
        if s.groups > 1:
            return (f"{s.param} is a grouped convolution (groups={s.groups}): lora-fx trains an update of its grouped "
                    "weight, and PEFT's grouped-conv LoRA is another function, with other shapes")
        if s.by_parameter or s.peft_target == "module":
            continue
        if s.peft_target == "none":
            return (f"{s.param} is read outside its module's forward (by a parent that calls F.linear on it), so PEFT "
                    "cannot wrap it, by module or by parameter")
        if s.kind == "conv" or s.fused:
            what = "a convolution kernel" if s.kind == "conv" else "adapted in row blocks"
            return (f"{s.param} belongs to a module PEFT does not wrap ({s.owner}), so PEFT reaches it only as a "
                    f"parameter target, but it is {what}, which PEFT's parameter targets cannot hold")
    if config.get("target_parameters") and config.get("fan_in_fan_out"):
        return ("it has GPT-2 Conv1D ([in, out]) weights and weights PEFT reaches only by parameter "
                f"({config['target_parameters'][0]}); PEFT's parameter targets refuse fan_in_fan_out")
    return None


def _block_spec(site: Site) -> list[list]:
    """The fused-block spec [(rows, adapted), ...] a site was matched with, disabled blocks included."""
    edges = sorted({0, site.out_features} | {b.start for b in site.blocks} | {b.stop for b in site.blocks})
    adapted = {(b.start, b.stop) for b in site.blocks}
    return [[hi - lo, (lo, hi) in adapted] for lo, hi in zip(edges, edges[1:])]


# ---------------------------------------------------------------------------------------------- load
def read_adapter(directory) -> AdapterFile:
    """The adapter in a folder, validated. Raises AdapterFileError before anything else happens when a
    file is missing, is a pickle, is corrupt, or holds fields lora-fx cannot honour."""
    from safetensors import SafetensorError, safe_open  # optional dependency (the `hf` extra)

    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"no adapter folder at {directory}")
    weights, config_path = directory / WEIGHTS, directory / CONFIG
    if not weights.is_file():
        pickles = [p for p in PICKLES if (directory / p).exists()]
        if pickles:
            raise AdapterFileError(
                f"{directory} holds {pickles[0]}, a pickle file, which lora-fx never loads (unpickling can run "
                f"code). Convert it to {WEIGHTS} where you trust it, e.g. with safetensors.torch.save_file."
            )
        raise AdapterFileError(f"{directory} has no {WEIGHTS}")
    if not config_path.is_file():
        raise AdapterFileError(f"{directory} has no {CONFIG}")
    raw = config_path.read_bytes()
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{config_path} is {len(raw)} bytes; an adapter config is a few KB")
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_path} must hold a JSON object")
    config = validate_config(config, config_path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    expected = metadata.get("lora_fx_config")
    if expected and expected != fingerprint(json.loads(raw)):
        raise AdapterFileError(
            f"{config_path} does not match {weights}: they were written by different saves (a save "
            "interrupted between the two files, or r / lora_alpha / targets edited by hand); save again"
        )
    lora, modules, base = {}, {}, {}
    for key, t in tensors.items():
        if not key.startswith(slot.FILE_PREFIX):
            raise AdapterFileError(f"unexpected key {key!r} in {weights}: PEFT keys start with {slot.FILE_PREFIX!r}")
        if not t.is_floating_point():
            raise AdapterFileError(f"{key} in {weights} has dtype {t.dtype}; adapter weights are floating point")
        name = slot.parse_file_key(key)
        if name is None and key.endswith(".base_layer.weight"):  # PEFT saved the embedding it adapted
            base[key[len(slot.FILE_PREFIX):-len(".base_layer.weight")] + ".weight"] = t
            continue
        if name is None:
            parts = key.split(".")
            first = next((i for i, part in enumerate(parts) if part.startswith("lora_")), None)
            if first is not None:  # e.g. lora_bias's lora_B.bias, KaSA's lora_diag
                raise AdapterFileError(f"{key} in {weights} is a {'.'.join(parts[first:])} weight of a LoRA variant "
                                       "lora-fx does not implement (a LoRA bias, KaSA, ...); lora-fx reads lora_A, "
                                       "lora_B and DoRA's lora_magnitude_vector")
            modules[key[len(slot.FILE_PREFIX):]] = t
        else:
            lora[name] = t
    scalings = {}
    for name, t in lora.items():
        if name.which == slot.LORA_A:  # the config's rank: an expert stack's lora_A has r * E rows
            # a parameter target's patterns are keyed by its parameter path (`<module>.<param>`)
            module = re.sub(r"(\.base_layer)+$", "", name.holder)
            keys = [name.holder] + [p for p in config["target_parameters"] or [] if p.rpartition(".")[0] == module]
            r = next((v for k in keys if (v := pattern_value(config["rank_pattern"], k, None)) is not None), config["r"])
            alpha = next((v for k in keys if (v := pattern_value(config["alpha_pattern"], k, None)) is not None),
                         config["lora_alpha"])
            scalings[name.holder] = alpha / (math.sqrt(r) if config["use_rslora"] else r)
    return AdapterFile(config, lora, modules, scalings, base)


def validate_config(config: dict, where) -> dict:
    unknown = {k: v for k, v in config.items() if k not in USED | IGNORED | set(NEUTRAL)}
    hostile = {k: v for k, v in unknown.items() if v not in (None, False, {}, [], "", 0)}
    if hostile:
        raise AdapterFileError(
            f"{where} has fields lora-fx does not know and cannot tell are harmless: {sorted(hostile)}. "
            "Remove them if they do not change the adapter, or use PEFT for this adapter."
        )
    if unknown:
        warnings.warn(f"{where}: ignoring unknown fields at neutral values: {sorted(unknown)}", stacklevel=3)
    for key, neutral in NEUTRAL.items():
        value = config.get(key, neutral)
        if value != neutral and not (neutral is None and value in ({}, [], False)):
            variant = f" ({VARIANTS[key]}, a PEFT variant lora-fx does not implement)" if key in VARIANTS else ""
            raise AdapterFileError(f"{where}: {key}={str(value)[:80]}{variant} is not supported by lora-fx "
                                   f"(only {neutral!r}); use PEFT for this adapter")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in VARIANT_INITS:
        raise AdapterFileError(f"{where}: init_lora_weights={init!r} makes {VARIANT_INITS[init.lower()]}, a PEFT variant "
                               "lora-fx does not implement; use PEFT for this adapter")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"{where}: peft_type {config.get('peft_type')!r} is not LoRA")

    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not positive_int(r):
        raise AdapterFileError(f"{where}: r must be a positive int, got {r!r}")
    if not positive(alpha):
        raise AdapterFileError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    dropout = config.get("lora_fx_dropout", config.get("lora_dropout", 0.0))  # lora_fx_dropout: see peft_config
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise AdapterFileError(f"{where}: lora_dropout must be in [0, 1), got {dropout!r}")
    targets, parameters = config.get("target_modules"), config.get("target_parameters") or []
    if not isinstance(parameters, list) or not all(isinstance(t, str) and t for t in parameters):
        raise AdapterFileError(f"{where}: target_parameters must be a list of parameter names, got {parameters!r}")
    if parameters and targets in (None, []):
        targets = []
    elif not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise AdapterFileError(f"{where}: target_modules must be a regex string or a list of module names, got {targets!r}")
    for key, check in (("rank_pattern", positive_int), ("alpha_pattern", positive)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and check(v) for k, v in pattern.items()):
            raise AdapterFileError(f"{where}: {key} must map module names to positive numbers, got {pattern!r}")
        for k in pattern:
            try:
                re.compile(k)
            except re.error:
                raise AdapterFileError(f"{where}: {key} key {k!r} is not a valid pattern") from None
    modules = config.get("modules_to_save") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise AdapterFileError(f"{where}: modules_to_save must be a list of module names, got {modules!r}")
    for key in ("use_rslora", "use_dora", "lora_bias"):
        if not isinstance(config.get(key, False), bool):
            raise AdapterFileError(f"{where}: {key} must be true or false")
    chosen = {k: config.get(k) for k in ("exclude_modules", "layers_to_transform", "layers_pattern")}
    try:
        selection(**chosen, string_targets=isinstance(targets, str))
    except ConfigError as e:
        raise AdapterFileError(f"{where}: {e}") from None
    return {
        "r": r, "lora_alpha": float(alpha), "lora_dropout": float(dropout), "target_modules": targets,
        "target_parameters": parameters or None,
        "rank_pattern": dict(config.get("rank_pattern") or {}), "alpha_pattern": dict(config.get("alpha_pattern") or {}),
        "modules_to_save": modules, "use_rslora": config.get("use_rslora", False), "use_dora": config.get("use_dora", False),
        "lora_bias": config.get("lora_bias", False),
        "lora_fx_blocks": config.get("lora_fx_blocks") or {},
        "init_lora_weights": config.get("init_lora_weights", True),
        "lora_fx_only": bool(config.get("lora_fx_only", False)),
        "loftq_config": config.get("loftq_config") or None,
        "selection": chosen,
    }


def _weights_for(sites: list[Site], file: AdapterFile, directory):
    """Map the file's LoRA weights to sites: ({weight name: [(A, B) per block]}, {weight name: rank},
    {weight name: DoRA magnitude}, {weight name: lora_B bias}); every site must have its weights and
    every LoRA weight must belong to a site."""
    holders = slot.file_holders(sites)
    by_holder = {holders[s.param]: s for s in sites}
    found: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    # the per-output vectors a variant adds beside A and B:
    # which -> (config flag, what (plural, one), the variant, {weight name: tensor})
    vectors = {slot.LORA_M: ("use_dora", "DoRA magnitudes", "DoRA magnitude (lora_magnitude_vector)", "DoRA", {}),
               slot.LORA_BIAS: ("lora_bias", "lora_B biases", "lora_B bias", "lora_bias", {})}
    extra = []
    for name, t in file.lora.items():
        site = by_holder.get(name.holder)
        if name.which in vectors:
            flag, these, _, _, into = vectors[name.which]
            if not file.config[flag]:
                raise AdapterFileError(f"{directory} holds {these} ({name.slot_free}) but its config says "
                                       f"{flag}: false; fix the config ({flag}: true) or remove them")
            if site is None:
                extra.append(slot.FILE_PREFIX + name.slot_free)
            else:
                into[site.param] = slot.from_file(site, name.which, t)
            continue
        if site is None or not name.matches(site, holders[site.param]) or name.embedding != (site.kind == "embedding"):
            extra.append(slot.FILE_PREFIX + name.slot_free)
            continue
        found.setdefault(site.param, {})[(name.which, name.block or 0)] = slot.from_file(site, name.which, t)
    missing = [holders[s.param] for s in sites if s.param not in found or len(found[s.param]) != 2 * len(s.blocks)]
    for flag, _, one, variant, into in vectors.values():
        lacking = [holders[s.param] for s in sites if file.config[flag] and s.param not in into]
        if lacking and not missing:
            raise AdapterFileError(f"{directory}: its config says {flag}: true, but it holds no {one} for "
                                   f"{lacking[:3]}; it is not a {variant} adapter, or is incomplete")
    if missing or extra:
        raise AdapterFileError(
            f"{directory} does not fit this model: " + "; ".join(filter(None, [
                f"missing LoRA weights for {missing[:4]}{' ...' if len(missing) > 4 else ''}" if missing else "",
                f"unexpected keys {extra[:4]}{' ...' if len(extra) > 4 else ''}" if extra else ""]))
            + ". Is it an adapter for another base model?"
        )
    weights, ranks = {}, {}
    for site in sites:
        pairs = [(found[site.param][(slot.LORA_A, b.index)], found[site.param][(slot.LORA_B, b.index)]) for b in site.blocks]
        ranks[site.param] = pairs[0][0].shape[site.rank_dims[0]]
        weights[site.param] = pairs
    return weights, ranks, vectors[slot.LORA_M][-1], vectors[slot.LORA_BIAS][-1]


def load_adapter(gm_or_model: nn.Module, directory, name: str = "default", *, example_inputs=None,
                 capture: str = "auto", loftq: LoftQConfig | None = None):
    """Load an adapter folder (PEFT's or lora-fx's). Given an untouched model (or a capture of it),
    capture it, inject the adapter and return the graph module; given a graph module with LoRA (or a
    regionally captured model), add the adapter under `name` (not active until set_adapter) and
    return it. `capture` as in `inject_lora` ("auto": by regions where the whole model does not trace).
    An adapter trained from LoftQ's start (lora-fx's files record it) sits on LoftQ's base, not the
    model's: pass loftq=LoftQConfig(original=<the float weights>) to rebuild it (the file's iterations)."""
    file = read_adapter(directory)
    if capture not in CAPTURES:
        raise ConfigError(f"capture must be one of {CAPTURES}, got {capture!r}")
    loftq = _file_loftq(file, directory, loftq, gm_or_model)
    _check_residual_target(file, directory, gm_or_model)
    regions = regions_of(gm_or_model)
    if regions is not None or (capture == "regions" and not isinstance(gm_or_model, LoraGraphModule)):
        if regions is not None and file.modules:
            raise AdapterFileError(f"{directory} also holds full module weights (modules_to_save); load it into the model instead")
        try:
            resolved = _resolved_file_targets(file, regions.source if regions else gm_or_model)
            _no_new_base_by_regions(loftq, file, directory)
            if regions is not None:
                return _load_into_regions(gm_or_model, file, directory, name, resolved)
            return _load_by_regions(gm_or_model, file, directory, name, example_inputs,
                                    "asked for (capture='regions')", resolved)
        except (TargetError, ConfigError) as e:
            raise AdapterFileError(f"the adapter in {directory} does not fit this model: {e}") from None
    state = unfolded_lora(gm_or_model)
    if state is None and isinstance(gm_or_model, LoraGraphModule) and gm_or_model.lora_state is not None:
        raise AdapterFileError("cannot load an adapter into a folded graph; load it into the model instead")
    if state is not None and file.modules:
        raise AdapterFileError(f"{directory} also holds full module weights (modules_to_save); load it into the model instead")
    if state is not None:
        base, exclude = base_copy(gm_or_model), state.exclude
    else:
        try:
            base = graph_to_adapt(gm_or_model, example_inputs)
        except CaptureError as e:
            if capture == "whole" or isinstance(gm_or_model, LoraGraphModule):
                raise
            try:
                resolved = _resolved_file_targets(file, gm_or_model)
                _no_new_base_by_regions(loftq, file, directory)
                return _load_by_regions(gm_or_model, file, directory, name, example_inputs,
                                        str(e).strip().splitlines()[0], resolved)
            except (TargetError, ConfigError) as err:
                raise AdapterFileError(f"the adapter in {directory} does not fit this model: {err}") from None
        exclude = output_layer(base.capture_info.source)
    _check_base_copies(base, file.base, directory)
    try:
        resolved = _resolved_file_targets(file, base.capture_info.source)
        matches, near = match_weights(base, resolved.spec, exclude=exclude)
        sites = [state.sites.get(m.site.param, m.site) if state is not None else m.site for m in matches]
        adapter = _adapter_from_file(base, name, sites, file, directory)
    except (TargetError, ConfigError) as e:
        raise AdapterFileError(f"the adapter in {directory} does not fit this model: {e}") from None
    if state is not None:
        attach_adapter(gm_or_model, sites, adapter)
        return gm_or_model
    rows = apply_loftq(base, adapter, sites, loftq, factors=False) if loftq is not None else []
    if is_residual(adapter.config.init):  # trained beside W0's residual: rebuild it as PEFT does on load
        apply_residual_init(base, adapter, sites, adapter.config.init, factors=False)
    gm = inject_matched(base, matches, near, adapter, file.config["modules_to_save"], exclude)
    gm.lora_state.report.loftq.extend(rows)
    _load_trainable(gm, file.modules, directory)
    return gm


def _file_loftq(file: AdapterFile, directory, loftq: LoftQConfig | None, target: nn.Module) -> LoftQConfig | None:
    """The LoftQ base a file needs, rebuilt when loading into a model: the config to apply (with the
    file's iterations), or None; a file from LoftQ's start is refused where its base cannot be had."""
    record = file.config.get("loftq_config")
    if record is None:
        if loftq is not None:
            raise ConfigError(f"loftq=... is given, but the adapter in {directory} was not trained from LoftQ's start")
        return None
    iterations = record.get("loftq_iter") if isinstance(record, dict) else None
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations <= 0:
        raise AdapterFileError(f"{directory}: loftq_config.loftq_iter must be a positive int, got {iterations!r}")
    state = unfolded_lora(target)
    if state is not None or regions_of(target) is not None:
        first = next(iter(state.adapters.values()), None) if state is not None else None
        if first is None or first.config.loftq_iterations != iterations:
            raise AdapterFileError(f"the adapter in {directory} was trained from LoftQ's start ({iterations} iterations): "
                                   "its base is LoftQ's re-quantized weights, which this graph does not hold; load it "
                                   "into the model with loftq=lora_fx.LoftQConfig(original=...)")
        return None  # the graph holds that very base already
    if loftq is None:
        raise AdapterFileError(f"the adapter in {directory} was trained from LoftQ's start ({iterations} iterations): its "
                               "base is LoftQ's re-quantized weights, not the model's. Pass "
                               "loftq=lora_fx.LoftQConfig(original=<the float model, its state dict or safetensors>) to "
                               "rebuild that base")
    return check_loftq("loftq", replace(loftq, iterations=iterations))


def _check_residual_target(file: AdapterFile, directory, target: nn.Module) -> None:
    """A PiSSA / OLoRA adapter sits on W0's residual: loading it into a model rebuilds the residual; a
    graph or regions cannot (their base is shared, or not captured whole), unless the graph's base
    already is that residual."""
    init = file.config.get("init_lora_weights")
    if not is_residual(init):
        return
    state = unfolded_lora(target)
    holds = state is not None and any(a.config.init == init for a in state.adapters.values())
    if (state is not None or regions_of(target) is not None) and not holds:
        raise AdapterFileError(f"the adapter in {directory} was trained from init_lora_weights={init!r}: it sits on the "
                               "residual of the base weights, which this graph does not hold; load it into the model "
                               "(the residual is rebuilt, as PEFT does), or save it with as_lora=True for a plain LoRA")


def _no_new_base_by_regions(loftq: LoftQConfig | None, file: AdapterFile, directory) -> None:
    """LoftQ's base and PiSSA / OLoRA's residual live in a whole-model capture."""
    init = file.config.get("init_lora_weights")
    if loftq is not None or is_residual(init):
        raise ConfigError(f"the adapter in {directory} sits on {'a LoftQ base' if loftq is not None else 'the ' + init + ' residual'}, "
                          "which lives in a whole-model capture; this model is captured by regions")


def _resolved_file_targets(file: AdapterFile, model: nn.Module | None):
    """The file's targets as PEFT applies them to `model` (its MoE renames, see match.resolve_targets),
    the rank / alpha patterns they add merged into the file's config."""
    config = file.config
    spec = parse_targets(file.targets(), config["target_parameters"], **config["selection"])
    spec.own_calls = not config["lora_fx_only"]  # a file PEFT reads means what it means in PEFT
    resolved = resolve_targets(spec, model, config["r"], config["lora_alpha"])
    if resolved.rank_pattern or resolved.alpha_pattern:
        file.config = {**config, "rank_pattern": {**config["rank_pattern"], **resolved.rank_pattern},
                       "alpha_pattern": {**config["alpha_pattern"], **resolved.alpha_pattern}}
    return resolved


def _check_base_copies(base: nn.Module, copies: dict[str, torch.Tensor], directory) -> None:
    """PEFT saves the base weights of the embeddings it adapts (save_embedding_layers); they must be
    this model's own: lora-fx adapts the model's weights and never replaces them."""
    params = dict(base.named_parameters())
    for name, t in copies.items():
        mine = params.get(name)
        if mine is None or mine.shape != t.shape or not torch.equal(t.to(mine.dtype), mine.detach().cpu()):
            raise AdapterFileError(
                f"{directory} carries its own {name} ({tuple(t.shape)}), which is not this model's "
                f"({tuple(mine.shape) if mine is not None else 'absent'}): a resized vocabulary, or another base model? "
                "Load the base model the adapter was trained on"
            )


def _file_config(file: AdapterFile) -> LoraConfig:
    config = file.config
    init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming"  # what a save writes back
    loftq = config.get("loftq_config") or {}
    init = "loftq" if loftq else config["init_lora_weights"] if is_residual(config["init_lora_weights"]) else init
    parameters = config["target_parameters"]
    return LoraConfig(file.targets(), config["r"], config["lora_alpha"], config["lora_dropout"], init,
                      tuple(config["modules_to_save"]), config["rank_pattern"], config["alpha_pattern"],
                      None if parameters is None else tuple(parameters), config["use_rslora"], config["use_dora"],
                      config["lora_bias"], loftq.get("loftq_iter", 0), selection=dict(config["selection"]))


def _file_weights(sites: list[Site], file: AdapterFile, directory):
    """The file's weights over `sites` (model paths), checked: ({weight: [(A, B)]}, ranks, alphas, DoRA
    magnitudes or None, lora_B biases or None); the ranks the weights have must be the config's, the
    alphas are the config's (rsLoRA's alpha / sqrt(r) expressed as an alpha for alpha / r)."""
    config = file.config
    weights, ranks, magnitudes, biases = _weights_for(sites, file, directory)
    for s in sites:
        want = pattern_value(config["rank_pattern"], pattern_key(s), config["r"])
        if ranks[s.param] != want:
            raise AdapterFileError(f"{directory}: {s.holder} has rank {ranks[s.param]} in the weights but {want} in the config")
    alphas = {s.param: pattern_value(config["alpha_pattern"], pattern_key(s), config["lora_alpha"]) for s in sites}
    return (weights, ranks, alphas, magnitudes if config["use_dora"] else None,
            biases if config["lora_bias"] else None)


def _adapter_from_file(base: LoraGraphModule, name: str, sites: list[Site], file: AdapterFile, directory):
    """The file's adapter over `sites`."""
    weights, ranks, alphas, magnitudes, biases = _file_weights(sites, file, directory)
    return new_adapter(base, name, _file_config(file), sites, weights=weights, ranks=ranks, alphas=alphas,
                       magnitudes=magnitudes, biases=biases)


def _load_by_regions(model: nn.Module, file: AdapterFile, directory, name: str, example_inputs, reason: str,
                     resolved) -> nn.Module:
    """The adapter loaded into `model` captured by regions (as inject_lora does where torch.export
    cannot capture the whole model)."""
    def from_file(sites):
        weights, _, _, magnitudes, biases = _file_weights(sites, file, directory)
        return weights, magnitudes, biases

    tree = inject_regions(model, resolved.spec, _file_config(file), name, file.config["modules_to_save"], example_inputs,
                          reason, output_layer(model), weights=from_file)
    _load_trainable(tree, file.modules, directory)
    return tree


def _load_into_regions(gm: nn.Module, file: AdapterFile, directory, name: str, resolved) -> nn.Module:
    """A second adapter into every region of a regionally captured model (empty where it adapts nothing)."""
    regions = regions_of(gm)
    specs = region_specs(gm, resolved.spec, output_layer(regions.source))
    local: dict[str, list[Site]] = {}
    for path, graph in each_region(gm):
        here = graph.lora_state
        matches = match_weights(base_copy(graph), specs[path])[0] if specs[path].keys() else []
        local[path] = [here.sites.get(m.site.param, m.site) for m in matches]
    sites = [global_site(s, p) for p, ss in local.items() for s in ss]
    weights, ranks, alphas, magnitudes, biases = _file_weights(sites, file, directory)
    config, added = _file_config(file), []
    for path, graph in each_region(gm):
        def mine(by_name, path=path):
            return None if by_name is None else {k[len(path) + 1:]: v for k, v in by_name.items() if k.startswith(path + ".")}
        added.append((graph, local[path], new_adapter(graph, name, config, local[path], weights=mine(weights),
                                                       ranks=mine(ranks), alphas=mine(alphas), magnitudes=mine(magnitudes),
                                                       biases=mine(biases))))
    for graph, ss, adapter in added:
        attach_adapter(graph, ss, adapter)
    return gm


def _load_trainable(gm: LoraGraphModule, saved: dict[str, torch.Tensor], directory) -> None:
    params = dict(gm.named_parameters())
    trainable = list(trainable_weights(gm))
    unknown = [k for k in saved if k not in trainable]
    missing = [k for k in trainable if k not in saved]
    bad = [k for k in saved if k in params and tuple(saved[k].shape) != tuple(params[k].shape)]
    if unknown or missing or bad:
        raise AdapterFileError(f"{directory}: modules_to_save weights do not fit: unexpected {unknown[:3]}, "
                               f"missing {missing[:3]}, wrong shape {bad[:3]}")
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)
