"""The transformers zoo through lora-fx and PEFT, side by side.

Every architecture in transformers' auto mappings (causal LM, seq2seq LM, masked LM, image
classification, sequence classification: one class per model type, in that order), built from its
default config shrunk (hidden 64, 2 layers, 4 heads), random weights, `targets="all-linear"`, r = 8.
Each model runs in a process of its own (a crash or a hang is that row's failure) through:

    build        the shrunk config builds and the eager forward runs (else the row is not counted)
    peft         PEFT's get_peft_model + forward works (PEFT's own row)
    inject       lora_fx.inject_lora (capture included; whole model or regions)
    init         output at init = the model's
    targets      the adapted weights are PEFT's targeted modules / parameters, no more, no fewer
    to_peft      random A and B: our file, loaded by PEFT, gives our outputs (and B moved them)
    from_peft    PEFT's random adapter, saved and loaded by lora-fx, gives PEFT's outputs
    train        one backward: every LoRA weight gets a gradient, no base weight does
    fold         merge_lora: outputs = unfolded, graph identical to the untouched capture
    merged       merge_and_unload: outputs = unfolded
    untouched    the user's model is exactly as it was

    python benchmarks/zoo.py                       # the whole zoo -> benchmarks/results/zoo.{json,md}
    python benchmarks/zoo.py --only t5 llama       # some model types
    python benchmarks/zoo.py --one t5              # one row in this process (prints its JSON)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
            "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
            "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES")
STEPS = ("build", "peft", "inject", "init", "targets", "to_peft", "from_peft", "train", "fold", "merged", "untouched")
RANK, ALPHA = 8, 16
# relative difference (max |a - b| / max |a|, |b|) that counts as equal: float32 rounding through a
# small model, never a wrong weight (a missing LoRA weight moves outputs by > 1e-3 here)
SAME = 1e-4

# config fields shrunk wherever they appear (top level and sub-configs), when the default is larger
SMALL = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64, "word_embed_proj_dim": 64,
    "projection_dim": 64, "text_embed_dim": 64, "vision_embed_dim": 64, "embedding_size": 64,
    "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "n_layers": 2, "encoder_layers": 2,
    "decoder_layers": 2, "num_decoder_layers": 2, "num_encoder_layers": 2, "depth": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "intermediate_size": 128, "ffn_dim": 128, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "d_ff": 128,
    "n_inner": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32, "ffn_hidden_size": 128,
    "head_dim": 16, "d_kv": 16, "kv_channels": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16, "q_lora_rank": 32, "kv_lora_rank": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "top_k": 2, "n_group": 1, "topk_group": 1,
    "max_position_embeddings": 512, "vocab_size": 1024, "image_size": 64, "num_channels": 3,
    "attention_hidden_size": 64, "rotary_dim": 8,
}
LIST_DEPTHS = ("depths", "encoder_depths", "decoder_depths")
# shrinking levels tried in turn until the model builds and runs: everything; all but head_dim; all but
# the head sizes (some attention variants tie them to each other)
HEAD_KEYS = {"head_dim", "d_kv", "kv_channels", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "q_lora_rank",
             "kv_lora_rank"}
LEVELS = (dict(SMALL), {k: v for k, v in SMALL.items() if k != "head_dim"},
          {k: v for k, v in SMALL.items() if k not in HEAD_KEYS})
MAX_PARAMS = 60_000_000  # a shrunk config that is still bigger is not built (counted on the meta device first)


def zoo() -> list[tuple[str, str]]:
    """(model type, class name), one per model type, first mapping first."""
    from transformers.models.auto import modeling_auto

    seen: dict[str, str] = {}
    for mapping in MAPPINGS:
        for model_type, cls in getattr(modeling_auto, mapping).items():
            seen.setdefault(model_type, cls if isinstance(cls, str) else cls[0])
    return sorted(seen.items())


def shrunk(config, small: dict = SMALL):
    """`config` with its sizes made small (sub-configs too), rebuilt through its class so derived
    fields (layer types, head dims) follow."""
    values = config.to_dict()
    for key, value in list(values.items()):
        sub = getattr(config, key, None)
        if hasattr(sub, "to_dict") and hasattr(sub, "model_type"):
            values[key] = shrunk(sub, small).to_dict()
        elif key == "image_size" and "window_size" in values:
            continue  # windowed vision models (Swin) size their relative position tables from it
        elif key in small and isinstance(value, int) and not isinstance(value, bool) and value > small[key]:
            values[key] = small[key]
        elif key in LIST_DEPTHS and isinstance(value, list):
            values[key] = [min(int(v), 1) for v in value]
        elif "heads" in key and isinstance(value, list) and all(isinstance(v, int) for v in value):
            values[key] = [min(v, 2) for v in value]  # per-stage heads must divide the shrunk widths
        elif key == "layer_types" and isinstance(value, list) and value:
            # hybrid stacks: one layer of each kind, in the order they first appear (2 at least)
            kinds = list(dict.fromkeys(value))
            n = max(len(kinds), 2)
            values[key] = (kinds * n)[:n]
            for count in ("num_hidden_layers", "num_layers"):
                if count in values:
                    values[count] = n
        elif key.endswith("_layer_types") or key in ("qk_head_dim", "out_features", "out_indices", "stage_names") or (
                key == "head_dim" and key not in small):
            values.pop(key)  # derived: rebuilt for the new layer count / head sizes
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                "cls_token_id", "mask_token_id"):
        v = values.get(key)
        if isinstance(v, int) and v >= values.get("vocab_size", 1 << 30):
            values[key] = 1
    values.pop("architectures", None)
    return type(config).from_dict(values)


def build(model_type: str, cls_name: str, small: dict = SMALL):
    import torch
    import transformers

    torch.manual_seed(0)
    cls = getattr(transformers, cls_name)
    # the class's own config (a text-only head of a multimodal family takes the text config)
    own = getattr(cls, "config_class", None)
    default = own() if own is not None and getattr(own, "model_type", None) else transformers.AutoConfig.for_model(model_type)
    config = shrunk(default, small)
    with torch.device("meta"):
        size = sum(p.numel() for p in cls(config).parameters())
    if size > MAX_PARAMS:
        raise ValueError(f"the shrunk config still has {size / 1e6:.0f}M parameters")
    return cls(config).eval()


def example_inputs(model) -> dict:
    """A batch of 2 for the model's main input (token ids, pixels, ...), seeded."""
    import torch

    gen = torch.Generator().manual_seed(0)
    config = model.config
    main = model.main_input_name
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 64)
    if main == "input_ids":
        ids = torch.randint(3, max(int(vocab), 4), (2, 7), generator=gen)
        inputs = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = torch.randint(3, max(int(vocab), 4), (2, 5), generator=gen)
        return inputs
    if main == "pixel_values":
        size = getattr(config, "image_size", 64)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        return {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), h, w, generator=gen)}
    raise ValueError(f"no example inputs for main input {main!r}")


def first_float(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    for v in out:
        found = first_float(v) if not isinstance(v, torch.Tensor) and isinstance(v, (tuple, list, dict)) else v
        if isinstance(found, torch.Tensor) and found.is_floating_point():
            return found
    raise ValueError("the model returns no floating-point tensor")


def float_outputs(out) -> list:
    """Every floating-point tensor the model returns (logits, pooled output, hidden states ...)."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in float_outputs(v)]
    return []


def rel_diff(a, b) -> float:
    a, b = first_float(a).double(), first_float(b).double()
    scale = max(a.abs().max().item(), b.abs().max().item())
    return 0.0 if scale == 0 else (a - b).abs().max().item() / scale


def one(model_type: str, cls_name: str) -> dict:
    """Every step on one architecture; a step's failure is recorded with its first line."""
    import torch

    import lora_fx

    row: dict = {"model_type": model_type, "class": cls_name, "steps": {}, "seconds": {}}
    state: dict = {}

    def step(name, fn):
        if any(v == "fail" for k, v in row["steps"].items() if k != "peft"):  # PEFT's failure is its own
            row["steps"][name] = "skip"
            return None
        t = time.perf_counter()
        try:
            value = fn()
            row["steps"][name] = "pass"
            return value
        except PeftItself as e:  # not ours to pass or fail: the row says why
            row["steps"][name] = "skip"
            row["note"] = f"{name}: {e}"
            return None
        except Exception as e:  # the row records why, the zoo goes on
            line = (str(e).strip().splitlines() or [""])[0]
            row["steps"][name] = "fail"
            row["error"] = f"{name}: {type(e).__name__}: {line[:400]}"
            row["traceback"] = traceback.format_exc()[-3000:]
            return None
        finally:
            row["seconds"][name] = round(time.perf_counter() - t, 2)

    def built():
        for level, small in enumerate(LEVELS):
            try:
                model = build(model_type, cls_name, small)
                inputs = example_inputs(model)
                with torch.no_grad():
                    state["ref"] = model(**inputs)
                first_float(state["ref"])
                break
            except Exception:
                if level == len(LEVELS) - 1:
                    raise
        row["shrink_level"] = level
        state["model"], state["inputs"] = model, inputs
        state["snap"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        row["params"] = sum(p.numel() for p in model.parameters())

    step("build", built)
    if row["steps"]["build"] != "pass":
        return row
    model, inputs = state["model"], state["inputs"]

    def peft_forward():
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                                                       init_lora_weights=False))
        with torch.no_grad():
            first_float(peft_model(**inputs))
        # which LoRA weights reach the outputs, in eval mode (a train-mode forward would move BatchNorm's
        # running statistics)
        state["peft_no_grad"] = peft_no_grad(peft_model, inputs)
        base = peft_model.base_model
        state["peft_targets"] = sorted(set(base.targeted_module_names) |
                                       {n.rpartition(".")[0] for n in getattr(base, "targeted_parameter_names", [])})
        state["peft_model"] = peft_model

    step("peft", peft_forward)
    peft_ok = row["steps"]["peft"] == "pass"
    row["peft_error"] = row.pop("error", None)
    row.pop("traceback", None)

    def inject():
        gm = lora_fx.inject_lora(model, "all-linear", rank=RANK, alpha=ALPHA, example_inputs=inputs)
        state["gm"] = gm
        row["sites"] = len(lora_fx.regions.model_sites(gm))
        regions = lora_fx.regions_of(gm)
        row["regions"] = sorted(regions.graphs) if regions is not None else []
        row["capture"] = "regions" if regions is not None else "whole"
        if regions is not None:
            row["regions_reason"] = regions.reason[:300]

    def init():
        with torch.no_grad():
            d = rel_diff(state["gm"](**inputs), state["ref"])
        assert d <= SAME, f"output at init differs from the model's by {d:.2e}"

    def targets():
        ours = sorted({s.file_path if not s.file_param else s.param.rpartition(".")[0]
                       for s in lora_fx.regions.model_sites(state["gm"]).values()})
        theirs = state.get("peft_targets")
        if theirs is None:
            raise RuntimeError("PEFT fails on this model; nothing to compare")
        row["targets_only_ours"] = sorted(set(ours) - set(theirs))
        row["targets_only_peft"] = sorted(set(theirs) - set(ours))
        assert not row["targets_only_ours"] and not row["targets_only_peft"], \
            f"{len(row['targets_only_ours'])} adapted only by lora-fx, {len(row['targets_only_peft'])} only by PEFT"

    def to_peft():
        from peft import PeftModel

        gm = state["gm"]
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in lora_fx.lora_parameters(gm).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            ours = gm(**inputs)
        moved = rel_diff(ours, state["ref"])
        degenerate = all(t.abs().max() == 0 for t in float_outputs(state["ref"]))  # MobileViTV2 at random init
        assert moved > 1e-3 or degenerate, f"random A and B move the output by only {moved:.1e}"
        with tempfile.TemporaryDirectory() as d:
            lora_fx.save_adapter(gm, d)
            theirs = PeftModel.from_pretrained(copy.deepcopy(model), d).eval()
            with torch.no_grad():
                diff = rel_diff(theirs(**inputs), ours)
        state["ours"] = ours
        # with these weights (a router's LoRA routes tokens elsewhere), which of PEFT's LoRA weights get none
        state["peft_no_grad"] = state.get("peft_no_grad", set()) | peft_no_grad(theirs, inputs)
        if diff > SAME:
            own = peft_own_round_trip(state["peft_model"], model, inputs)
            if own > SAME:
                raise PeftItself(f"PEFT reads our file into other outputs ({diff:.2e}), and its own file for this model "
                                 f"too ({own:.2e}: save_pretrained, then from_pretrained)")
        assert diff <= SAME, f"PEFT reads our file into other outputs (relative difference {diff:.2e})"

    def from_peft():
        peft_model = state["peft_model"]
        with tempfile.TemporaryDirectory() as d:
            peft_model.save_pretrained(d)
            loaded = lora_fx.load_adapter(model, d, example_inputs=inputs)
            with torch.no_grad():
                diff = rel_diff(loaded(**inputs), peft_model(**inputs))
        assert diff <= SAME, f"lora-fx reads PEFT's file into other outputs (relative difference {diff:.2e})"

    def train():
        gm = state["gm"]
        # in eval mode, as PEFT's gradients above: a train-mode forward routes other tokens in some MoE
        # models (switch_transformers' router jitter), and an expert no token reaches rightly gets no gradient
        sum(t.float().square().mean() for t in float_outputs(gm(**inputs))).backward()
        lora = lora_fx.lora_parameters(gm)
        # no gradient is right where the weight does not reach the outputs: not run by this capture (PEFT
        # wraps it all the same), or computed into an output the model drops (a causal LM's pooler);
        # PEFT's own LoRA gets no gradient there either
        sites = lora_fx.regions.model_sites(gm)
        unused = {sites[s.param].holder for s in gm.lora_report.sites if not s.uses}
        unused |= state.get("peft_no_grad", set())
        missing = [n for n, p in lora.items() if p.grad is None and lora_fx.parse_lora_name(n).holder not in unused]
        frozen = [n for n, p in gm.named_parameters() if p.grad is not None and n not in lora and p.requires_grad is False]
        assert not missing, (f"{len(missing)} LoRA weights got no gradient, e.g. {missing[0]} (PEFT's without one: "
                             f"{sorted(state.get('peft_no_grad', ()))[:4]})")
        assert not frozen, f"base weight {frozen[0]} got a gradient"
        for p in lora.values():
            p.grad = None

    def fold():
        folded = lora_fx.merge_lora(state["gm"])
        with torch.no_grad():
            diff = rel_diff(folded(**inputs), state["ours"])
        assert diff <= SAME, f"folded outputs differ from unfolded by {diff:.2e}"
        untouched = (lora_fx.regions.untouched(state["gm"]) if lora_fx.regions_of(folded) is not None
                     else lora_fx.capture(model, inputs))
        diff_graph = lora_fx.graph_diff(untouched, folded)
        assert diff_graph.identical, f"folded graph is not the original: {str(diff_graph)[:200]}"

    def merged():
        out = lora_fx.merge_and_unload(state["gm"])
        with torch.no_grad():
            diff = rel_diff(out(**inputs), state["ours"])
        assert diff <= SAME, f"merge_and_unload outputs differ from unfolded by {diff:.2e}"

    def untouched():
        now = model.state_dict()
        changed = [k for k, v in state["snap"].items() if k not in now or not torch.equal(now[k], v)]
        assert not changed, f"the model changed: {changed[:3]}"

    step("inject", inject)
    step("init", init)
    if peft_ok:
        step("targets", targets)
        step("to_peft", to_peft)
        step("from_peft", from_peft)
    else:
        for name in ("targets", "to_peft", "from_peft"):
            row["steps"][name] = "skip"
        if row["steps"]["init"] == "pass":
            gm = state["gm"]
            with torch.no_grad():
                for p in lora_fx.lora_parameters(gm).values():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
                state["ours"] = gm(**inputs)
    step("train", train)
    step("fold", fold)
    step("merged", merged)
    step("untouched", untouched)
    return row


def run_one_in_subprocess(model_type: str, cls_name: str, timeout: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, __file__, "--one", model_type, "--cls", cls_name], capture_output=True,
                           text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"model_type": model_type, "class": cls_name, "steps": {}, "error": f"timeout after {timeout} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"model_type": model_type, "class": cls_name, "steps": {}, "error": f"process died: {tail[:300]}"}
    row = json.loads(lines[-1])
    row["wall"] = round(time.perf_counter() - t, 1)
    return row


def peft_no_grad(peft_model, inputs) -> set[str]:
    """Module paths of the LoRA weights of `peft_model` that get no gradient from its outputs (eval
    mode: a train-mode forward would move BatchNorm's running statistics)."""
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)  # a loaded adapter is frozen (inference)
    sum(t.float().square().mean() for t in float_outputs(peft_model(**inputs))).backward()
    found = {re.sub(r"(\.base_layer)+", "", n.removeprefix("base_model.model.").split(".lora_")[0])
             for n, p in peft_model.named_parameters() if "lora_" in n and p.grad is None}
    peft_model.zero_grad(set_to_none=True)
    return found


class PeftItself(Exception):
    """A step PEFT cannot pass on its own (it cannot load its own file for the model): not counted."""


def peft_own_round_trip(peft_model, model, inputs) -> float:
    """Relative output difference after PEFT saves its model with random LoRA weights and loads the
    file back onto a copy of `model` (0 when PEFT reads its own files)."""
    import torch
    from peft import PeftModel

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        expected = peft_model(**inputs)
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        back = PeftModel.from_pretrained(copy.deepcopy(model), d).eval()
        with torch.no_grad():
            return rel_diff(back(**inputs), expected)


def verdict(row: dict) -> str:
    """"not built" (not counted), "pass", or the first failing step."""
    steps = row.get("steps", {})
    if steps.get("build") != "pass":
        return "not built" if "build" in steps else "crash/timeout"
    failed = [s for s in STEPS if steps.get(s) == "fail" and s != "peft"]
    return failed[0] if failed else "pass"


def summary(rows: list[dict]) -> str:
    built = [r for r in rows if r.get("steps", {}).get("build") == "pass" or verdict(r) == "crash/timeout"]
    peft_ok = [r for r in built if r.get("steps", {}).get("peft") == "pass"]
    ours = [r for r in built if verdict(r) == "pass"]
    both = [r for r in peft_ok if verdict(r) == "pass"]
    lines = [f"{len(rows)} architectures; {len(built)} build from a shrunk config and run eagerly; PEFT's forward works "
             f"on {len(peft_ok)}; lora-fx passes every step on {len(ours)} ({len(both)} of PEFT's {len(peft_ok)}).", ""]
    by: dict[str, list[str]] = {}
    for r in built:
        v = verdict(r)
        if v != "pass":
            by.setdefault(v, []).append(r["model_type"])
    lines += ["| first failing step | architectures |", "|---|---|"]
    for v, names in sorted(by.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| {v} ({len(names)}) | {', '.join(sorted(names))} |")
    lines += ["", "| model | class | verdict | sites | inject s | PEFT | error |", "|---|---|---|---|---|---|---|"]
    for r in sorted(built, key=lambda r: r["model_type"]):
        err = (r.get("error") or r.get("note") or "").replace("|", "\\|")[:160]
        lines.append(f"| {r['model_type']} | {r['class']} | {verdict(r)} | {r.get('sites', '')} | "
                     f"{r.get('seconds', {}).get('inject', '')} | {r.get('steps', {}).get('peft', '')} | {err} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help="run one model type in this process and print its row as JSON")
    ap.add_argument("--cls", help="the class for --one (default: the zoo's)")
    ap.add_argument("--only", nargs="*", help="model types to run")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=420)
    ap.add_argument("--out", default=str(RESULTS / "zoo"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.one:
        import torch

        torch.set_num_threads(1)
        cls = args.cls or dict(zoo())[args.one]
        print(json.dumps(one(args.one, cls)))
        return 0
    models = [(t, c) for t, c in zoo() if not args.only or t in args.only]
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda tc: run_one_in_subprocess(*tc, timeout=args.timeout), models):
            rows.append(row)
            print(f"{row['model_type']:<28} {verdict(row):<14} {row.get('error', '')[:110]}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    out.with_suffix(".md").write_text(summary(rows) + "\n")
    print(summary(rows).split("\n")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
