"""PEFT's initialisations that start from the base weight (PiSSA, fast PiSSA, OLoRA) and PEFT's
orthogonal init, against PEFT on a tiny Llama and GPT-2 (Conv1D, [in, out]): the same factors and
residual, the pretrained output at init, the model untouched, files both ways (PEFT's own save, and
PEFT's conversion to a plain LoRA on W0), and a fold to the original graph."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import lora_fx
from helpers import assert_close, assert_unchanged, randomize_lora, snapshot, tiny_gpt2, tiny_llama, token_ids

peft = pytest.importorskip("peft")

ROWS = {"llama": (tiny_llama, ["q_proj", "v_proj"]), "gpt2": (tiny_gpt2, ["c_attn"])}


@pytest.fixture(scope="module", params=list(ROWS))
def row(request):
    build, targets = ROWS[request.param]
    model = build()
    return request.param, model, lora_fx.capture(model), targets


def _peft(model, targets, init, **kw):
    config = peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=init,
                             fan_in_fan_out=targets == ["c_attn"], **kw)
    return peft.get_peft_model(copy.deepcopy(model), config).eval()


def _peft_layers(peft_model):
    return {path + ".weight": m for path, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_are_peft_s(row, init, tmp_path):
    name, model, capture, targets = row
    snap = snapshot(model)
    gm = lora_fx.inject_lora(capture, targets, rank=4, alpha=8, init=init)
    # PEFT's olora_init ignores fan_in_fan_out: on GPT-2's [in, out] Conv1D it factors W0^T and gives
    # lora_B the wrong shape, so PEFT's own OLoRA is broken there; lora-fx factors W0 as [out, in]
    peft_works = not (name == "gpt2" and init == "olora")
    batch = token_ids()
    with torch.no_grad():
        assert_close(gm(**batch), model(**batch), ulps=2000)  # the pretrained output at init
    ours = lora_fx.adapter_weights(gm)
    layers = _peft_layers(_peft(model, targets, init)) if peft_works else {}
    assert set(layers) == (set(gm.lora_state.sites) if peft_works else set())
    for param, [(a, b)] in ours.items() if peft_works else ():
        layer = layers[param]
        assert_close(a, layer.lora_A["default"].weight, ulps=1000, what=param)
        assert_close(b, layer.lora_B["default"].weight, ulps=1000, what=param)
        assert_close(gm.get_parameter(param), layer.base_layer.weight, ulps=1000, what=param)  # the residual
    assert_unchanged(model, snap)

    randomize_lora(gm, std=0.1)  # "trained"
    with torch.no_grad():
        trained = gm(**batch)
    # PEFT's own save: init_lora_weights names the init, PEFT rebuilds the residual on load
    lora_fx.save_adapter(gm, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["init_lora_weights"] == init
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a").eval() if peft_works else None
    again = lora_fx.load_adapter(capture, tmp_path / "a")
    # PEFT's conversion: a rank-8 plain LoRA on the untouched W0
    lora_fx.save_adapter(gm, tmp_path / "plain", as_lora=True)
    plain = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert plain["r"] == 8 and plain["lora_alpha"] == 16 and plain["init_lora_weights"] is True
    converted = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "plain").eval()
    plain_ours = lora_fx.load_adapter(capture, tmp_path / "plain")
    with torch.no_grad():
        for other in (m for m in (loaded, again, converted, plain_ours) if m is not None):
            assert_close(other(**batch), trained, ulps=5000)
    folded = lora_fx.merge_lora(gm)
    assert lora_fx.graph_diff(capture, folded).identical  # W_res + s·B·A in the original graph
    assert_close(folded(**batch), trained, ulps=5000)
    assert_unchanged(model, snap)


def test_fast_pissa_keeps_the_output_and_nears_the_full_svd():
    model = tiny_llama()
    capture = lora_fx.capture(model)
    full = lora_fx.inject_lora(capture, ["q_proj"], rank=4, alpha=8, init="pissa")
    fast = lora_fx.inject_lora(capture, ["q_proj"], rank=4, alpha=8, init="pissa_niter_8")
    batch = token_ids()
    with torch.no_grad():
        assert_close(fast(**batch), model(**batch), ulps=2000)
    for param, site in full.lora_state.sites.items():
        # the randomized SVD finds most of the top-r part the full SVD finds (a tiny random model's
        # spectrum is flat: the hardest case), and W_res + s·B·A = W0 either way
        captured = lora_fx.delta_weight(fast, site).norm() / lora_fx.delta_weight(full, site).norm()
        assert 0.8 < captured <= 1 + 1e-5, captured
        w0 = model.get_parameter(param)
        assert_close(fast.get_parameter(param) + lora_fx.delta_weight(fast, site), w0, ulps=1000)


def test_orthogonal_init_starts_at_the_model():
    model = tiny_llama()
    gm = lora_fx.inject_lora(model, ["q_proj", "v_proj"], rank=4, init="orthogonal")
    for param, [(a, b)] in lora_fx.adapter_weights(gm).items():
        assert a.abs().min() > 0 and b.abs().max() > 0  # neither factor zero (PEFT's: both random)
        assert (b @ a).abs().max() < 1e-6 * a.norm() * b.norm()
    with pytest.raises(lora_fx.ConfigError, match="even rank"):
        lora_fx.inject_lora(model, ["q_proj"], rank=3, init="orthogonal")


def test_init_refusals():
    torchao = pytest.importorskip("torchao")  # noqa: F841
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    model = tiny_llama()
    snap = snapshot(model)
    gm = lora_fx.inject_lora(model, ["q_proj"], rank=4)
    with pytest.raises(lora_fx.ConfigError, match="every adapter of a graph shares"):
        lora_fx.add_adapter(gm, "p", ["q_proj"], init="pissa")
    with pytest.raises(lora_fx.ConfigError, match="plain LoRA already"):
        lora_fx.save_adapter(gm, "/tmp/never", as_lora=True)
    with pytest.raises(lora_fx.ConfigError, match="init must be .*'pissa_niter_<n>'"):
        lora_fx.inject_lora(model, ["q_proj"], init="pissa_fast")
    assert_unchanged(model, snap)
    nf4 = copy.deepcopy(model)
    for layer in nf4.model.layers:
        q = layer.self_attn.q_proj
        q.weight = torch.nn.Parameter(to_nf4(q.weight.detach(), 32, 8), requires_grad=False)
    with pytest.raises(lora_fx.ConfigError, match=r"quantized \(nf4\): initialize PiSSA under float32.*init='olora'"):
        lora_fx.inject_lora(nf4, ["q_proj"], init="pissa")
    olora = lora_fx.inject_lora(nf4, ["q_proj"], rank=4, init="olora")  # the residual re-quantized, as PEFT's bnb route
    param = "model.layers.0.self_attn.q_proj.weight"
    assert type(olora.get_parameter(param)) is type(nf4.get_parameter(param))
    batch = token_ids()
    with torch.no_grad():
        assert (olora(**batch).logits - model(**batch).logits).abs().max() < 0.1
