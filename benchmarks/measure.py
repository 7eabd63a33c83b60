"""Memory and one-off timings, each in a fresh process (called by cpu_suite.py; prints JSON).

    python benchmarks/measure.py train <lorafx|peft|full|floor>
    python benchmarks/measure.py inject <lorafx|peft> [hidden] [layers]
    python benchmarks/measure.py meta7b
"""
from __future__ import annotations

import copy
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import PeakRSS  # noqa: E402

CPU_CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=8000, tie_word_embeddings=False)
TARGETS = ["q_proj", "v_proj"]


def build(config=CPU_CONFIG, device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config))
    return model.train()


def trainer(kind: str, model, ids):
    """A closure doing one training step of `kind` on `ids` (forward, loss, backward, AdamW step)."""
    import lora_fx

    vocab = model.config.vocab_size

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))

    if kind == "floor":  # forward + backward to the input embeddings; no weight gets a gradient
        for p in model.parameters():
            p.requires_grad_(False)
        embed = model.get_input_embeddings()

        def step():
            x = embed(ids).detach().requires_grad_()
            loss_of(model(inputs_embeds=x).logits).backward()
        return step
    if kind == "lorafx":
        net = lora_fx.inject_lora(model, TARGETS, rank=8, alpha=16, example_inputs={"input_ids": ids[:2]})
        net.train()
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        net.train()
    elif kind == "full":
        net = model
    else:
        raise ValueError(kind)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss_of(net(input_ids=ids).logits).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def warm_imports():
    """Load torch.export / PEFT machinery once so its import cost is not counted as memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_fx

    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, vocab_size=32))
    lora_fx.inject_lora(tiny, TARGETS, rank=2, example_inputs={"input_ids": torch.zeros(2, 5, dtype=torch.long)})
    try:
        from peft import LoraConfig, get_peft_model

        get_peft_model(copy.deepcopy(tiny), LoraConfig(r=2, target_modules=TARGETS))
    except ImportError:
        pass


def tensor_storages() -> dict[int, int]:
    """data pointer -> bytes of every real (not fake, not meta) tensor storage alive."""
    import gc

    out = {}
    gc.collect()
    for o in gc.get_objects():
        if type(o) in (torch.Tensor, torch.nn.Parameter) and not o.is_meta:
            storage = o.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def main(argv):
    torch.set_num_threads(2)
    what = argv[0]
    if what == "train":
        kind = argv[1]
        model = build()
        ids = torch.randint(0, CPU_CONFIG["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(1))
        warm_imports()
        step = trainer(kind, model, ids)
        with PeakRSS() as mem:
            for _ in range(3):
                step()
        print(json.dumps({"case": kind, "peak_rss_rise_mb": mem.rise / 2**20}))
    elif what == "inject":
        kind = argv[1]
        hidden = int(argv[2]) if len(argv) > 2 else CPU_CONFIG["hidden_size"]
        layers = int(argv[3]) if len(argv) > 3 else CPU_CONFIG["num_hidden_layers"]
        model = build(dict(CPU_CONFIG, hidden_size=hidden, intermediate_size=hidden * 1376 // 512, num_hidden_layers=layers))
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        warm_imports()
        ids = torch.randint(0, CPU_CONFIG["vocab_size"], (2, 128))
        before = tensor_storages()
        with PeakRSS() as mem:
            t = time.perf_counter()
            if kind == "lorafx":
                import lora_fx

                net = lora_fx.inject_lora(model, TARGETS, rank=8, alpha=16, example_inputs={"input_ids": ids})
            else:
                from peft import LoraConfig, get_peft_model

                net = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
            seconds = time.perf_counter() - t
        # tensor bytes that exist now and did not before: the LoRA weights, and a copied base weight if any
        new_tensor_bytes = sum(b for ptr, b in tensor_storages().items() if ptr not in before)
        lora_bytes = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
        print(json.dumps({"case": kind, "seconds": seconds, "peak_rss_rise_mb": mem.rise / 2**20,
                          "model_mb": model_bytes / 2**20, "rise_over_model": mem.rise / model_bytes,
                          "layers": layers, "hidden": hidden, "new_tensor_mb": new_tensor_bytes / 2**20,
                          "lora_mb": lora_bytes / 2**20}))
    elif what == "meta7b":
        import lora_fx

        config = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
        model = build(config, device="meta").eval()
        params = sum(p.numel() for p in model.parameters())
        t = time.perf_counter()
        gm = lora_fx.inject_lora(model, TARGETS, rank=16, alpha=32)
        inject_s = time.perf_counter() - t
        t = time.perf_counter()
        lora_fx.merge_lora(gm)
        fold_s = time.perf_counter() - t
        print(json.dumps({"case": "meta7b", "params": params, "nodes": len(gm.graph.nodes),
                          "capture_inject_s": inject_s, "fold_s": fold_s, "sites": len(gm.lora_state.sites)}))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
