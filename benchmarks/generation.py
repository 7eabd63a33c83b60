"""Generation side by side: SmolLM2-135M-Instruct with LoRA r=8 on q/v, every way lora-fx generates
against transformers / PEFT, in one interleaved run (medians), on the CPU.

    python benchmarks/generation.py [--quick] [--tiny]   # writes results/generation.{md,json}

Cases (tokens per second, prompt 32, 64 new tokens, greedy, batch 1 and 8): HF `generate` on the
untouched model; PEFT's `generate` on the unmerged PeftModel; `gm.generate`; `merge_and_unload(gm)
.generate`; ONNX Runtime (`export.generate`) on the untouched and on the folded kv-cache exports; the
multi-adapter session with the adapter switched every request; a batch of 8 rows over 4 adapters
against the same batch with one adapter (mixed session); onnxruntime-genai on the folded file. Also
the per-token latency at position 16 and 256 for the cached paths. --tiny: a small random Llama
instead of SmolLM2 (a dry run in seconds).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from common import RESULTS, interleaved, markdown  # noqa: E402

PROMPT, NEW, TARGETS = 32, 64, ["q_proj", "v_proj"]


def load(tiny: bool):
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                            max_position_embeddings=512)).eval()
    from smollm2_lora import load as load_smollm2

    return load_smollm2()[1].eval()


def adapters(gm, lora_fx, n: int = 4) -> list[str]:
    """Adapters a0..a{n-1}, random as if trained (B ~ N(0, 0.02))."""
    names = [f"a{i}" for i in range(n)]
    for name in names[1:]:
        lora_fx.add_adapter(gm, name, rank=8, alpha=16, init="kaiming")
    for i, name in enumerate(names):
        lora_fx.set_adapter(gm, name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in lora_fx.lora_parameters(gm, lora_fx.LORA_B).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    lora_fx.set_adapter(gm, names[0])
    return names


def peft_copy(model, gm, lora_fx):
    """PEFT's unmerged model with the very same A and B as adapter a0 of `gm`."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).eval()
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, p in lora_fx.lora_parameters(gm).items():
            params["base_model.model." + name.replace(".a0.", ".default.")].copy_(p)
    return peft_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--tiny", action="store_true", help="a small random Llama (a dry run)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    import export
    import lora_fx

    started = time.perf_counter()
    model = load(args.tiny)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(10, vocab, (b, PROMPT), generator=g) for b in (1, 8)}
    gm = lora_fx.inject_lora(model, TARGETS, rank=8, alpha=16, init="kaiming", adapter="a0",
                             example_inputs={"input_ids": prompts[1][:, :8].repeat(2, 1)})
    names = adapters(gm, lora_fx)
    gm.eval()
    merged = lora_fx.merge_and_unload(gm)
    peft_model = peft_copy(model, gm, lora_fx)
    folded = lora_fx.merge_lora(gm)

    d = Path(tempfile.mkdtemp(prefix="lorafx-gen-"))
    paths, t = {}, time.perf_counter()
    for kind in ("base", "folded", "multi", "mixed"):
        (d / kind).mkdir()
        path = d / kind / "model.onnx"
        if kind == "base":
            export.export_onnx(model, path, kv_cache=True)
        elif kind == "folded":
            export.export_onnx(folded, path, kv_cache=True)
        else:
            export.export_multi_adapter(gm, path, kv_cache=True, mixed=4 if kind == "mixed" else 0)
            for name in names:
                export.export_adapter(gm, d / kind / f"{name}.onnx_adapter", path, name=name)
        paths[kind] = path
    export_s = time.perf_counter() - t
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    sessions = {k: export.ort_session(paths[k], options=options) for k in ("base", "folded")}
    servers = {}
    for kind in ("multi", "mixed"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        servers[kind] = export.AdapterServer(paths[kind], options=options)
        for name in names:
            servers[kind].load(name, d / kind / f"{name}.onnx_adapter")

    genai = None
    try:
        import onnxruntime_genai as og

        genai_model = og.Model(str(d / "folded"))

        def genai(ids, new):
            params = og.GeneratorParams(genai_model)
            params.set_search_options(max_length=ids.shape[1] + new, min_length=ids.shape[1] + new, do_sample=False,
                                      batch_size=ids.shape[0])
            generator = og.Generator(genai_model, params)
            generator.append_tokens(ids.numpy())
            while not generator.is_done():
                generator.generate_next_token()
    except ImportError:
        print("onnxruntime-genai not installed: its case is left out")

    # greedy agreement first: every path gives the same tokens (no eos: full length)
    ids = prompts[1]
    kw = dict(max_new_tokens=16, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        ref = merged.generate(input_ids=ids, do_sample=False, **kw)
        agree = {
            "gm.generate": torch.equal(gm.generate(ids, **kw), ref),
            "PEFT unmerged": torch.equal(peft_model.generate(input_ids=ids, do_sample=False, **kw), ref),
            "ORT folded": torch.equal(export.generate(sessions["folded"], ids, 16), ref),
            "ORT multi-adapter": torch.equal(servers["multi"].generate(ids, adapter="a0", max_new_tokens=16), ref),
            "ORT mixed": torch.equal(servers["mixed"].generate(ids, adapter=["a0"], max_new_tokens=16), ref),
        }
    print("greedy tokens equal merge_and_unload's:", agree)

    def hf(m, b, new=NEW, prompt=None):
        x = prompts[b] if prompt is None else prompt
        return lambda: m.generate(input_ids=x, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)

    cycle = {"i": 0}

    def switched(b):
        def run():
            cycle["i"] += 1
            servers["multi"].generate(prompts[b], adapter=names[cycle["i"] % len(names)], max_new_tokens=NEW)
        return run

    rows = []
    rounds, per_round = (2, 1) if args.quick else (4, 2)
    for b in (1, 8):
        cases = {
            "HF generate, untouched model": hf(model, b),
            "PEFT generate, unmerged": hf(peft_model, b),
            "lora-fx gm.generate (unfolded)": lambda b=b: gm.generate(prompts[b], NEW, eos_token_id=None),
            "merge_and_unload(gm).generate": hf(merged, b),
            "ORT untouched kv export": lambda b=b: export.generate(sessions["base"], prompts[b], NEW),
            "ORT folded kv export": lambda b=b: export.generate(sessions["folded"], prompts[b], NEW),
            "ORT multi-adapter, adapter switched per request": switched(b),
        }
        if b == 8:
            mixed_rows = [names[i % 4] for i in range(8)]
            cases["ORT mixed session, 8 rows over 4 adapters"] = lambda: servers["mixed"].generate(
                prompts[8], adapter=mixed_rows, max_new_tokens=NEW)
            cases["ORT mixed session, 8 rows, one adapter"] = lambda: servers["mixed"].generate(
                prompts[8], adapter=["a0"] * 8, max_new_tokens=NEW)
        if genai is not None:
            cases["onnxruntime-genai, folded file"] = lambda b=b: genai(prompts[b], NEW)
        with torch.no_grad():
            times = interleaved(cases, rounds=rounds, per_round=per_round, warmup=1)
        hf_s = times["HF generate, untouched model"]
        for name, s in times.items():
            rows.append({"batch": b, "case": name, "tok_s": round(b * NEW / s, 1), "vs_hf": round(hf_s / s, 2),
                         "ms": round(1000 * s, 1)})

    # per-token latency at position 16 and 256: (time of p + n new) - (time of p + 1 new), over n - 1
    latency = []
    n = 16
    for position in (16, 256):
        prompt = torch.randint(10, vocab, (1, position), generator=g)
        cases = {}
        for name, make in {
            "HF generate, untouched": lambda new, p=prompt: hf(model, 1, new, p),
            "lora-fx gm.generate": lambda new, p=prompt: (lambda: gm.generate(p, new, eos_token_id=None)),
            "ORT folded kv export": lambda new, p=prompt: (lambda: export.generate(sessions["folded"], p, new)),
        }.items():
            cases[(name, n)] = make(n)
            cases[(name, 1)] = make(1)
        with torch.no_grad():
            times = interleaved(cases, rounds=rounds, per_round=per_round, warmup=1)
        for name in {k[0] for k in cases}:
            per_token = (times[(name, n)] - times[(name, 1)]) / (n - 1)
            latency.append({"case": name, "position": position, "ms": round(1000 * per_token, 2)})
    by = {(r["case"], r["position"]): r["ms"] for r in latency}
    lat_rows = [{"case": c, "p16": by[(c, 16)], "p256": by[(c, 256)], "ratio": round(by[(c, 256)] / by[(c, 16)], 2)}
                for c in dict.fromkeys(r["case"] for r in latency)]

    name = "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct"
    header = (f"Generation, {datetime.date.today()}, {platform.machine()}, {args.threads} threads, torch "
              f"{torch.__version__}, onnxruntime {ort.__version__}; {name}, LoRA r=8 on q/v; prompt {PROMPT}, "
              f"{NEW} new tokens, greedy; medians of {rounds} x {per_round} interleaved runs; kv exports "
              f"{export_s:.0f} s; wall {time.perf_counter() - started:.0f} s")
    text = "\n\n".join([
        header,
        "greedy tokens equal merge_and_unload(gm).generate: " + ", ".join(f"{k} {v}" for k, v in agree.items()),
        markdown(rows, [("batch", "batch"), ("case", "case"), ("tokens/s", "tok_s"), ("x HF untouched", "vs_hf"),
                        ("ms per call", "ms")]),
        markdown(lat_rows, [("per-token latency, batch 1", "case"), ("at 16 (ms)", "p16"), ("at 256 (ms)", "p256"),
                            ("256 / 16", "ratio")]),
    ])
    RESULTS.mkdir(exist_ok=True)
    suffix = "_tiny" if args.tiny else ""
    (RESULTS / f"generation{suffix}.md").write_text(text + "\n")
    (RESULTS / f"generation{suffix}.json").write_text(json.dumps({"rows": rows, "latency": lat_rows, "agree": agree,
                                                                  "header": header}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
