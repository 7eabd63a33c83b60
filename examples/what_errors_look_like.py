"""Every kind of bad input lora-fx refuses, and the message it gives (a markdown table).

    python examples/what_errors_look_like.py
"""
import json
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import export
import lora_fx


def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


def main():
    model = tiny()
    ids = {"input_ids": torch.randint(0, 64, (2, 7))}
    tmp = Path(tempfile.mkdtemp())
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=4, example_inputs=ids)
    lora_fx.save_adapter(gm, tmp / "good")

    def corrupt():
        d = tmp / "corrupt"
        lora_fx.save_adapter(gm, d)
        w = d / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[:-50])
        return lora_fx.load_adapter(gm, d, name="x")

    def pickle_file():
        d = tmp / "pickle"
        d.mkdir()
        (d / "adapter_config.json").write_text((tmp / "good" / "adapter_config.json").read_text())
        torch.save({}, d / "adapter_model.bin")
        return lora_fx.load_adapter(model, d, example_inputs=ids)

    def hostile():
        d = tmp / "hostile"
        lora_fx.save_adapter(gm, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["kasa_config"] = {"r": 4}  # a PEFT variant lora-fx does not implement
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        return lora_fx.load_adapter(model, d, example_inputs=ids)

    def nan_fold():
        g = lora_fx.inject_lora(model, ["q_proj"], rank=2, example_inputs=ids)
        with torch.no_grad():
            next(iter(lora_fx.lora_parameters(g, lora_fx.LORA_B).values()))[0, 0] = float("inf")
        return lora_fx.merge_lora(g)

    cases = [
        ("targets that match nothing", lambda: lora_fx.inject_lora(model, ["q_prj"], example_inputs=ids)),
        ("a LayerNorm target", lambda: lora_fx.inject_lora(model, ["input_layernorm"], example_inputs=ids)),
        ("rank 0", lambda: lora_fx.inject_lora(model, ["q_proj"], rank=0, example_inputs=ids)),
        ("alpha <= 0", lambda: lora_fx.inject_lora(model, ["q_proj"], alpha=0, example_inputs=ids)),
        ("dropout = 1", lambda: lora_fx.inject_lora(model, ["q_proj"], dropout=1.0, example_inputs=ids)),
        ("fused blocks that do not add up", lambda: lora_fx.inject_lora(model, {"q_proj": [(16, True), (8, False)]}, example_inputs=ids)),
        ("data-dependent control flow", lambda: lora_fx.inject_lora(Branchy(), ["lin"], example_inputs=(torch.randn(2, 4),))),
        ("inputs the forward does not declare", lambda: lora_fx.capture(model, {"input_idz": ids["input_ids"]})),
        ("no example inputs for a plain module", lambda: lora_fx.capture(nn.Linear(4, 4))),
        ("fold a graph without LoRA", lambda: lora_fx.merge_lora(lora_fx.capture(model, ids))),
        ("inject twice", lambda: lora_fx.inject_lora(gm, ["k_proj"])),
        ("NaN / inf in an adapter at fold", nan_fold),
        ("truncated safetensors", corrupt),
        ("a pickle file as adapter", pickle_file),
        ("a config field that changes the math", hostile),
        ("adapter for another base model", lambda: lora_fx.load_adapter(
            tiny().__class__(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=64)), tmp / "good", example_inputs=ids)),
        ("save into a missing directory", lambda: lora_fx.save_adapter(gm, tmp / "a" / "b" / "c")),
        ("an adapter name the graph does not have", lambda: lora_fx.set_adapter(gm, "topic")),
        ("ONNX export to a missing directory", lambda: export.export_onnx(model, tmp / "x" / "m.onnx", ids)),
    ]
    print("| bad input | error | message |\n|---|---|---|")
    for what, call in cases:
        try:
            call()
            print(f"| {what} | (no error!) | |")
        except lora_fx.LoraFxError as e:
            msg = " ".join(str(e).split())
            msg = msg.replace(str(tmp), "<dir>").replace("|", "\\|")
            print(f"| {what} | {type(e).__name__} | {msg[:400]}{'...' if len(msg) > 400 else ''} |")


if __name__ == "__main__":
    main()
