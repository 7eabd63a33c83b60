"""Quickstart: inject LoRA into a small Llama, train a few steps, fold, and show the graph diffs.

Runs in a few seconds on CPU; the model is built from a config with random weights (no downloads).
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora_fx


def main():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    model = LlamaForCausalLM(config).eval()
    batch = torch.randint(0, config.vocab_size, (4, 32))

    gm = lora_fx.inject_lora(model, targets=["q_proj", "v_proj"], rank=8, alpha=16,
                             example_inputs={"input_ids": batch[:2]})
    print(gm.lora_report, end="\n\n")

    # train: only lora_A / lora_B require grad; `labels` is a new input, captured on the fly
    gm.train()
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=3e-3)
    for step in range(10):
        loss = gm(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, 9):
            print(f"step {step}: loss {loss.item():.4f}")
    gm.eval()

    # fold B @ A into W0: the graph is the original model's again
    folded = lora_fx.merge_lora(gm)
    with torch.no_grad():
        err = (folded(input_ids=batch).logits - gm(input_ids=batch).logits).abs().max().item()
    print(f"\nfolded vs unfolded logits: max abs {err:.2e}")
    base = lora_fx.capture(model, {"input_ids": batch[:2]})
    print("original vs injected:", str(lora_fx.graph_diff(base, gm)).splitlines()[0])
    print("original vs folded:  ", lora_fx.graph_diff(base, folded))


if __name__ == "__main__":
    main()
