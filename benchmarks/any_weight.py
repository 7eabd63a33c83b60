"""LoRA on weights other than nn.Linear (convolutions, an embedding, MoE expert stacks): lora-fx against
PEFT, training and inference, one interleaved run per row, on the CPU.

    python benchmarks/any_weight.py [--quick] [--threads 2]   # writes benchmarks/results/any_weight.{md,json}

--quick: 2 rounds of 1 call, prints the tables and writes nothing.

The UNet row needs diffusers (in the `test` extra, so `make` installs it; LORA_FX_BENCH_SITE may point
to another site that has it). (without diffusers the row is skipped). Rows: a ResNet-style conv net (every Conv2d), a small
diffusers UNet2DConditionModel (attention projections and resnet convs), a Llama with LoRA on the
input embedding, a tiny Mixtral with LoRA on the expert stacks (target_parameters). LoRA r=8, alpha 16,
dropout 0, the same A and B in lora-fx and PEFT (random B, copied through PEFT's state dict), PEFT on a
deep copy of the same model. Per row, ONE interleaved run (common.interleaved, medians) of: a training
step (forward + loss + backward + AdamW step, train mode) of lora-fx and of PEFT; inference (eval,
no_grad) of the folded lora-fx graph (merge_lora), the untouched capture (lora_fx.capture), the
untouched eager model (twice: the spread of the two is the noise of the run) and PEFT's merged model
(merge_and_unload). One-off wall times (perf_counter): inject_lora (including its torch.export
capture), lora_fx.capture, merge_lora, get_peft_model and merge_and_unload (these two: median of 3).
A last table times, in plain torch, the two ways of putting LoRA on one Conv2d: (a) the activation
branch conv(x, W) + convB(convA(x)) * s (PEFT's; lora-fx's for large dense convs) against (b) the
weight delta conv(x, W + s * (B @ A).view(W.shape)) (lora-fx's for grouped convs and for dense ones
with Cout * Cin * k * k <= 65536, lora_fx.rewrite.CONV_WEIGHT_FORM_MAX).
"""
from __future__ import annotations

import os
import sys

if os.environ.get("LORA_FX_BENCH_SITE"):  # a private site with diffusers (see the docstring)
    sys.path.insert(0, os.environ["LORA_FX_BENCH_SITE"])

import argparse
import copy
import datetime
import json
import platform
import time
import traceback
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, markdown

OUT = Path(__file__).resolve().parent / "results"
RANK, ALPHA = 8, 16


# ---------------------------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, c)

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(y)))


class ResNet(nn.Module):
    """A stride-2 3x3 stem to 64 channels, 3 residual blocks of two 3x3 convs (GroupNorm), a linear head."""

    def __init__(self, c: int = 64, blocks: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(blocks)])
        self.head = nn.Linear(c, classes)

    def forward(self, pixel_values):
        x = self.blocks(F.relu(self.stem(pixel_values)))
        return self.head(x.mean(dim=(2, 3)))


def resnet_row():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.randn(2, 3, 64, 64, generator=g)}
    labels = torch.randint(0, 10, (2,), generator=g)
    targets = ["stem", "conv1", "conv2"]
    return {"model": ResNet(), "batch": batch, "targets": targets, "parameters": None,
                "peft": {"target_modules": targets}, "loss": lambda out: F.cross_entropy(out, labels),
                "what": "ResNet-style: stride-2 stem + 3 blocks of 2 x Conv2d(64, 64, 3), GroupNorm; 2x3x64x64; "
                     "targets every Conv2d (7)"}


def unet_row():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    g = torch.Generator().manual_seed(1)
    batch = {"sample": torch.randn(2, 4, 32, 32, generator=g), "timestep": torch.tensor([10, 10]),
             "encoder_hidden_states": torch.randn(2, 8, 32, generator=g)}
    target = torch.randn(2, 4, 32, 32, generator=g)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    assert not missing, f"UNet has no module named {missing}"
    return {"model": model, "batch": batch, "targets": targets, "parameters": None, "peft": {"target_modules": targets},
                "loss": lambda out: F.mse_loss(out, target),
                "what": "diffusers UNet2DConditionModel (block_out_channels (32, 64), 1 layer per block, cross-attn "
                     "dim 32); sample 2x4x32x32, encoder states 2x8x32; targets to_q/k/v, to_out.0, resnet conv1/conv2"}


def lm_loss(vocab, ids):
    return lambda logits: F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))


def embedding_row():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=128,
                         tie_word_embeddings=False, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    ids = torch.randint(3, 32000, (4, 64), generator=torch.Generator().manual_seed(1))
    targets = ["embed_tokens", "q_proj", "v_proj"]
    return {"model": model, "batch": {"input_ids": ids}, "targets": targets, "parameters": None,
                "peft": {"target_modules": targets}, "loss": lm_loss(32000, ids),
                "what": "Llama, hidden 256, intermediate 688, 2 layers, vocab 32000, untied; 4x64 tokens; targets "
                     "embed_tokens, q_proj, v_proj"}


def moe_row():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=1000,
                           max_position_embeddings=128, use_cache=False, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    model = MixtralForCausalLM(config)
    ids = torch.randint(3, 1000, (4, 64), generator=torch.Generator().manual_seed(1))
    targets, parameters = ["q_proj", "v_proj"], ["experts.gate_up_proj", "experts.down_proj"]
    return {"model": model, "batch": {"input_ids": ids}, "targets": targets, "parameters": parameters,
                "peft": {"target_modules": targets, "target_parameters": parameters}, "loss": lm_loss(1000, ids),
                "what": "Mixtral, hidden 128, intermediate 256, 2 layers, 8 experts top-2, vocab 1000; 4x64 tokens; "
                     "targets q_proj, v_proj + target_parameters experts.gate_up_proj, experts.down_proj"}


ROWS = {"conv (ResNet block)": resnet_row, "conv (UNet)": unet_row, "embedding": embedding_row,
        "MoE experts": moe_row}


# ------------------------------------------------------------------------------------------- helpers
def main_output(out):
    """The tensor a loss reads: logits / sample of a ModelOutput, the first of a tuple, or the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "sample"):
        if hasattr(out, key):
            return getattr(out, key)
        if isinstance(out, dict) and key in out:
            return out[key]
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot read an output tensor from {type(out).__name__}")


class LoraFxError(Exception):
    """An exception raised inside lora_fx, re-raised with the stage it happened in."""


def stage(name, fn, *args, **kwargs):
    """fn(...), with any exception from lora_fx wrapped so the row records it as a lora-fx failure."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise LoraFxError(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def trainer(net, batch, loss_of):
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    net.train()

    def step():
        loss_of(main_output(net(**batch))).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in params)


def inferer(net, batch):
    net.eval()

    def run():
        with torch.no_grad():
            net(**batch)
    return run


def run_row(label: str, spec: dict, rounds: int, per_round: int) -> dict:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    import lora_fx

    model, batch = spec["model"].eval(), spec["batch"]
    row = {"row": label, "what": spec["what"]}
    gm, row["inject_s"] = timed(lambda: stage("inject_lora", lora_fx.inject_lora, model, spec["targets"], rank=RANK,
                                              alpha=ALPHA, example_inputs=batch,
                                              target_parameters=spec["parameters"]))
    report = getattr(gm, "lora_report", None)
    row["report"] = str(report).splitlines()[0] if report is not None else ""
    cap, row["capture_s"] = timed(lambda: stage("capture", lora_fx.capture, model, batch))
    # random B (A is already random), then the same A and B into PEFT's model through its state dict
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in stage("lora_parameters", lora_fx.lora_parameters, gm, lora_fx.LORA_B).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    peft_times = []
    for _ in range(3):
        fresh = copy.deepcopy(model)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, **spec["peft"])
        peft_model, s = timed(lambda fresh=fresh, config=config: get_peft_model(fresh, config))
        peft_times.append(s)
    row["get_peft_model_s"] = sorted(peft_times)[1]
    tensors = stage("adapter_file", lambda: lora_fx.adapter_file(gm).tensors())
    result = set_peft_model_state_dict(peft_model, tensors)
    missing = [k for k in result.missing_keys if "lora_" in k]
    assert not missing and not result.unexpected_keys, f"PEFT state dict: missing {missing[:3]}, " \
                                                       f"unexpected {result.unexpected_keys[:3]}"
    gm.eval()
    peft_model.eval()
    with torch.no_grad():
        ours = main_output(stage("gm forward", gm, **batch))
        row["max_abs_vs_peft"] = (ours - main_output(peft_model(**batch))).abs().max().item()
        row["lora_effect"] = (ours - main_output(model(**batch))).abs().max().item()

    folds = []
    for _ in range(3):
        folded, s = timed(lambda: stage("merge_lora", lora_fx.merge_lora, gm))
        folds.append(s)
    row["fold_s"] = sorted(folds)[1]
    merges = []
    for _ in range(3):
        fresh = copy.deepcopy(peft_model)
        merged, s = timed(fresh.merge_and_unload)
        merges.append(s)
    row["merge_and_unload_s"] = sorted(merges)[1]
    with torch.no_grad():
        row["max_abs_folded_vs_unfolded"] = (main_output(stage("folded forward", folded, **batch)) - ours).abs().max().item()
        row["max_abs_folded_vs_peft_merged"] = (main_output(folded(**batch)) - main_output(merged(**batch))).abs().max().item()

    # training on gm (its base weights are the model's, frozen), PEFT on its deep copy
    train_lorafx, row["trainable_lorafx"] = trainer(gm, batch, spec["loss"])
    train_peft, row["trainable_peft"] = trainer(peft_model, batch, spec["loss"])
    stage("training step", train_lorafx)  # one step outside the timing, so a failure is lora-fx's
    cases = {
        "train lora-fx": train_lorafx,
        "train PEFT": train_peft,
        "infer folded": inferer(folded, batch),
        "infer untouched capture": inferer(cap, batch),
        "infer untouched eager": inferer(model, batch),
        "infer untouched eager (again)": inferer(model, batch),
        "infer PEFT merged": inferer(merged, batch),
    }
    times = interleaved(cases, rounds=rounds, per_round=per_round, warmup=2)
    row.update({f"{k} ms": round(1000 * v, 2) for k, v in times.items()})
    row["train_ratio"] = times["train lora-fx"] / times["train PEFT"]
    row["folded_vs_capture"] = times["infer folded"] / times["infer untouched capture"]
    row["folded_vs_eager"] = times["infer folded"] / times["infer untouched eager"]
    row["noise"] = times["infer untouched eager (again)"] / times["infer untouched eager"]
    return row


# ------------------------------------------------------------------------------------- conv branch
def conv_branch(rounds: int, per_round: int) -> list[dict]:
    """(a) activation branch vs (b) weight delta on one Conv2d(64, 64, 3, padding=1), x 8x64x32x32
    requiring grad (a layer inside a network), W frozen, A and B trainable; fwd+bwd and fwd only."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 32, 32, generator=g).requires_grad_()
    rows = []
    for groups in (1, 4):
        w = torch.randn(64, 64 // groups, 3, 3, generator=g) * 0.05
        rows += [one_conv(x, w, groups, r, g, rounds, per_round) for r in (8, 32)]
    return rows


def one_conv(x, w, groups: int, r: int, g, rounds: int, per_round: int) -> dict:
    s = ALPHA / r
    # (a): PEFT's layers: lora_A Conv2d(in, r, 3) (never grouped), lora_B Conv2d(r, out, 1, groups)
    a_conv = (torch.randn(r, 64, 3, 3, generator=g) * 0.05).requires_grad_()
    b_conv = (torch.randn(64, r // groups, 1, 1, generator=g) * 0.05).requires_grad_()
    # (b): A (r, in/groups * 9), B (out, r), delta (B @ A).view(W.shape)
    a_mat = (torch.randn(r, w[0].numel(), generator=g) * 0.05).requires_grad_()
    b_mat = (torch.randn(64, r, generator=g) * 0.05).requires_grad_()
    gy = torch.randn(8, 64, 32, 32, generator=g)

    def branch():
        y = F.conv2d(x, w, padding=1, groups=groups)
        return y + F.conv2d(F.conv2d(x, a_conv, padding=1), b_conv, groups=groups) * s

    def delta():
        return F.conv2d(x, w + s * (b_mat @ a_mat).view(w.shape), padding=1, groups=groups)

    def fwd_bwd(fn):
        def run():
            fn().backward(gy)
            x.grad = a_conv.grad = b_conv.grad = a_mat.grad = b_mat.grad = None
        return run

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    same = "n/a (other function)"  # PEFT's grouped branch (dense lora_A, grouped lora_B) is another function
    if groups == 1:  # the two are the same function when A, B are reshapes of each other
        with torch.no_grad():
            a_conv.copy_(a_mat.view(r, 64, 3, 3))
            b_conv.copy_(b_mat.view(64, r, 1, 1))
            same = f"{(branch() - delta()).abs().max().item():.1e}"
    t = interleaved({"a fb": fwd_bwd(branch), "b fb": fwd_bwd(delta), "a f": fwd(branch), "b f": fwd(delta)},
                    rounds=rounds, per_round=per_round, warmup=2)
    return {"conv": "Conv2d(64, 64, 3)" + (f", groups={groups}" if groups > 1 else ""), "rank": r,
            "a_fb": round(1000 * t["a fb"], 2), "b_fb": round(1000 * t["b fb"], 2),
            "ratio_fb": round(t["b fb"] / t["a fb"], 2), "a_f": round(1000 * t["a f"], 2),
            "b_f": round(1000 * t["b f"], 2), "ratio_f": round(t["b f"] / t["a f"], 2), "max_abs_a_vs_b": same}


# --------------------------------------------------------------------------------------------- main
def fmt_s(x):
    return "" if x is None else (f"{x:.2f}" if x >= 0.1 else f"{1000 * x:.1f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run: few rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", nargs="*", help="only these rows (labels as in the table)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds, per_round = (2, 1) if args.quick else (15, 3)
    started = time.perf_counter()

    import peft
    import transformers

    import lora_fx

    # the first torch.export of a process pays for its imports and set-up: not any row's inject time
    lora_fx.inject_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], rank=2, alpha=4, example_inputs={"input": torch.randn(2, 4)})

    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None

    rows, failures = [], []
    for label, build in ROWS.items():
        if args.rows and label not in args.rows:
            continue
        if label == "conv (UNet)" and diffusers_version is None:
            rows.append({"row": label, "status": "skipped: diffusers not importable (see LORA_FX_BENCH_SITE)"})
            print(f"{label}: skipped, diffusers not importable")
            continue
        print(f"{label} ...", flush=True)
        t = time.perf_counter()
        try:
            row = run_row(label, build(), rounds, per_round)
            row["status"] = "ok"
        except LoraFxError as e:
            tb = traceback.format_exception(e.__cause__)
            row = {"row": label, "status": f"lora-fx FAILED: {e}", "traceback": "".join(tb)}
            failures.append(row)
            print("".join(tb), file=sys.stderr)
        except Exception as e:  # noqa: BLE001  PEFT or the benchmark itself: also recorded, marked as not lora-fx's
            tb = traceback.format_exc()
            row = {"row": label, "status": f"failed (outside lora-fx): {type(e).__name__}: "
                                           f"{str(e).splitlines()[0] if str(e) else ''}", "traceback": tb}
            failures.append(row)
            print(tb, file=sys.stderr)
        row["row_wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print({k: v for k, v in row.items() if k not in ("traceback", "what")}, flush=True)

    micro = conv_branch(rounds, per_round)

    def r2(x, n=2):
        return "" if x is None else round(x, n)

    table_rows = []
    for row in rows:
        if row.get("status") != "ok":
            table_rows.append({"row": row["row"], "train_lorafx": row["status"]})
            continue
        table_rows.append({
            "row": row["row"],
            "train_lorafx": row["train lora-fx ms"], "train_peft": row["train PEFT ms"],
            "train_ratio": r2(row["train_ratio"]),
            "folded": row["infer folded ms"], "capture": row["infer untouched capture ms"],
            "eager": row["infer untouched eager ms"], "eager2": row["infer untouched eager (again) ms"],
            "peft_merged": row["infer PEFT merged ms"],
            "f_cap": r2(row["folded_vs_capture"]), "f_eager": r2(row["folded_vs_eager"]),
            "inject": fmt_s(row["inject_s"]), "capture_s": fmt_s(row["capture_s"]), "fold": fmt_s(row["fold_s"]),
            "get_peft": fmt_s(row["get_peft_model_s"]), "merge": fmt_s(row["merge_and_unload_s"]),
            "err": f"{row['max_abs_vs_peft']:.1e}", "ferr": f"{row['max_abs_folded_vs_unfolded']:.1e}",
        })
    main_table = markdown(table_rows, [
        ("row", "row"), ("train lora-fx (ms)", "train_lorafx"), ("train PEFT (ms)", "train_peft"),
        ("lora-fx / PEFT", "train_ratio"), ("infer folded (ms)", "folded"), ("infer capture (ms)", "capture"),
        ("infer eager (ms)", "eager"), ("eager again (ms)", "eager2"), ("PEFT merged eager (ms)", "peft_merged"),
        ("folded / capture", "f_cap"), ("folded / eager", "f_eager"), ("inject_lora (s)", "inject"),
        ("capture (s)", "capture_s"), ("merge_lora (s)", "fold"), ("get_peft_model (s)", "get_peft"),
        ("merge_and_unload (s)", "merge"), ("max abs vs PEFT", "err"), ("max abs folded vs unfolded", "ferr"),
    ])
    micro_table = markdown(micro, [
        ("conv (x 8x64x32x32)", "conv"), ("rank", "rank"), ("(a) branch fwd+bwd (ms)", "a_fb"),
        ("(b) delta fwd+bwd (ms)", "b_fb"), ("b / a fwd+bwd", "ratio_fb"), ("(a) fwd (ms)", "a_f"),
        ("(b) fwd (ms)", "b_f"), ("b / a fwd", "ratio_f"), ("max abs a vs b", "max_abs_a_vs_b"),
    ])
    what = "\n".join(f"- {r['row']}: {r['what']}" for r in rows if "what" in r)
    header = (
        f"Any-weight LoRA benchmark, {datetime.date.today()}, {platform.machine()} ({platform.processor() or 'cpu'}), "
        f"{os.cpu_count()} cores, {args.threads} torch threads (shared machine), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, diffusers {diffusers_version or 'absent'}; "
        f"{'QUICK smoke run, ' if args.quick else ''}LoRA r={RANK}, alpha {ALPHA}, dropout 0; wall "
        f"{time.perf_counter() - started:.0f} s.\n\n"
        f"Timed per row in ONE interleaved run (benchmarks/common.py `interleaved`, {rounds} rounds x {per_round} "
        "timed calls after warm-up, shuffled order each round; medians): a training step (forward + loss + backward "
        "+ AdamW step over the trainable parameters, train mode) of the lora-fx graph and of PEFT's model (a deep "
        "copy of the same weights, the same A and B); inference in eval mode under no_grad of the folded lora-fx "
        "graph (merge_lora), the untouched capture (lora_fx.capture), the untouched eager model (twice, as two "
        "cases: their spread is this run's noise) and PEFT's merge_and_unload model. One-off times (perf_counter): "
        "inject_lora on the eager model (includes its torch.export capture) and lora_fx.capture once each; "
        "merge_lora, get_peft_model and merge_and_unload median of 3. HF models with use_cache=False. "
        "'max abs vs PEFT': unfolded lora-fx against unmerged PEFT outputs, random B (std 0.02), before training.\n\n"
        + what)
    micro_text = (
        "Conv-branch choice, plain torch: one Conv2d(64, 64, 3, padding=1) (or groups=4) on x 8x64x32x32 that "
        "requires grad, W frozen, A and B trainable, s = 16 / r; (a) conv(x, W) + convB(convA(x)) * s with PEFT's "
        "shapes (convA 3x3 to r channels, never grouped; convB 1x1, grouped like W) against (b) conv(x, W + s * "
        "(B @ A).view(W.shape)). fwd+bwd: forward then backward of a fixed random output gradient; fwd: under "
        "no_grad. Interleaved medians as above. For groups=4 (a) is PEFT's grouped LoRA, a different function "
        "from (b) = W + s*BA, which is what lora-fx computes there.")
    fail_text = ""
    if failures:
        fail_text = "\n\nFailures (first line; the traceback is in the json):\n" + "\n".join(
            f"- {f['row']}: {f['status']}" for f in failures)
    text = f"{header}\n\n{main_table}\n\n{micro_text}\n\n{micro_table}" + fail_text
    print(text)
    if args.quick:  # a smoke run leaves the results as they were
        return 0
    OUT.mkdir(exist_ok=True)
    (OUT / "any_weight.md").write_text(text + "\n")
    (OUT / "any_weight.json").write_text(json.dumps({"header": header, "rows": rows, "conv_branch": micro,
                                                   "rounds": rounds, "per_round": per_round}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
