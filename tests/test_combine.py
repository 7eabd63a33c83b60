"""combine_adapters against PEFT's add_weighted_adapter: the same combined lora_A / lora_B for every
deterministic combination type and the output with it active; DARE compared in distribution (PEFT
draws its masks after initialising the new adapter's weights, so the same seed gives other masks);
a combined adapter that saves, loads into PEFT and folds to the original graph."""
from __future__ import annotations

import copy

import pytest
import torch

import lora_fx
from helpers import assert_close, randomize_lora, tiny_llama, token_ids

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]
METHODS = [("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"rank": 3}), ("svd", {"svd_clamp": 0.9}),
           ("ties", {"density": 0.5}), ("ties_svd", {"density": 0.5, "majority_sign_method": "frequency"}),
           ("magnitude_prune", {"density": 0.5}),
           ("magnitude_prune_svd", {"density": 0.5})]
PEFT_NAMES = {"rank": "svd_rank"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A graph with adapters a (r=4, alpha 8) and b (r=4, alpha 16), random factors, and PEFT's model
    with the same two adapters read from lora-fx's files."""
    model = tiny_llama()
    gm = lora_fx.inject_lora(model, TARGETS, rank=4, alpha=8, adapter="a")
    lora_fx.add_adapter(gm, "b", TARGETS, rank=4, alpha=16)
    folder = tmp_path_factory.mktemp("pair")
    for i, name in enumerate(("a", "b")):
        lora_fx.set_adapter(gm, name)
        randomize_lora(gm, std=0.3, seed=i + 1)
        lora_fx.save_adapter(gm, folder / name, name=name)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder / "a", adapter_name="a")
    theirs.load_adapter(folder / "b", adapter_name="b")
    return model, gm, theirs.eval()


def _peft_factors(peft_model, name):
    out = {}
    for path, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            out[path + ".weight"] = (module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach())
    return out


@pytest.mark.parametrize("method, options", METHODS, ids=[m + "".join(f"-{k}" for k in o) for m, o in METHODS])
def test_combined_adapters_are_peft_s(pair, method, options):
    model, gm, theirs = pair
    name = "c_" + method + "".join(f"_{k}" for k in options)
    torch.manual_seed(0)  # DARE draws its masks from torch's generator in PEFT; here from `seed`
    theirs.add_weighted_adapter(["a", "b"], [0.7, -0.4], name, combination_type=method,
                                **{PEFT_NAMES.get(k, k): v for k, v in options.items()})
    lora_fx.combine_adapters(gm, {"a": 0.7, "b": -0.4}, name, method, seed=0, **options)
    ours, peft_factors = lora_fx.adapter_weights(gm, name), _peft_factors(theirs, name)
    assert ours.keys() == peft_factors.keys()
    for param, [(a, b)] in ours.items():
        pa, pb = peft_factors[param]
        if method.endswith("svd"):  # an SVD's factors are unique up to signs: compare the update
            assert_close(b @ a, pb @ pa, ulps=2000, what=param)
        else:
            assert_close(a, pa, ulps=100, what=param)
            assert_close(b, pb, ulps=100, what=param)
    batch = token_ids()
    lora_fx.set_adapter(gm, name)
    theirs.set_adapter(name)
    with torch.no_grad():
        assert_close(gm(**batch), theirs(**batch), ulps=2000)
    if method == "cat":  # exact: the weighted sum of the updates
        site = gm.lora_state.sites["model.layers.0.self_attn.q_proj.weight"]
        expected = 0.7 * lora_fx.delta_weight(gm, site, "a") - 0.4 * lora_fx.delta_weight(gm, site, "b")
        assert_close(lora_fx.delta_weight(gm, site, name), expected, ulps=100)


DARE = ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]


def _updates(gm, name):
    return torch.cat([lora_fx.delta_weight(gm, s, name).flatten() for s in gm.lora_state.sites.values()])


@pytest.mark.parametrize("method", DARE)
def test_dare_is_peft_s_in_distribution(pair, method):
    """Seeded: the same seed, the same adapter. Against PEFT: ours is as far from PEFT's draw as
    PEFT's draws are from each other; on the factors, each entry is kept with probability `density`
    (zero where both adapters' entries were dropped: (1 - density)^2 of them)."""
    model, gm, theirs = pair
    density = 0.6
    for seed in (0, 1):
        torch.manual_seed(seed)
        theirs.add_weighted_adapter(["a", "b"], [0.7, -0.4], f"p{method}{seed}", combination_type=method, density=density)
    for name, seed in ((f"o{method}", 0), (f"o{method}again", 0), (f"o{method}other", 1)):
        lora_fx.combine_adapters(gm, {"a": 0.7, "b": -0.4}, name, method, density=density, seed=seed)
    ours, again, other = (_updates(gm, f"o{method}{x}") for x in ("", "again", "other"))
    assert torch.equal(ours, again) and not torch.equal(ours, other)
    peft_updates = {}
    for seed in (0, 1):
        theirs.set_adapter(f"p{method}{seed}")
        peft_updates[seed] = torch.cat([
            (m.get_delta_weight(f"p{method}{seed}")).flatten() for _, m in theirs.base_model.model.named_modules()
            if hasattr(m, "lora_A") and f"p{method}{seed}" in m.lora_A])
    spread = (peft_updates[1] - peft_updates[0]).norm()
    assert 0.5 * spread < (ours - peft_updates[0]).norm() < 2 * spread
    if not method.endswith("svd"):
        factors = torch.cat([t.flatten() for pairs in lora_fx.adapter_weights(gm, f"o{method}").values()
                             for a, b in pairs for t in (a, b)])
        assert abs((factors == 0).float().mean().item() - (1 - density) ** 2) < 0.05


def test_a_combined_adapter_saves_loads_and_folds(pair, tmp_path):
    model, gm, _ = pair
    lora_fx.combine_adapters(gm, {"a": 1.0, "b": 1.0}, "sum", "cat")
    lora_fx.set_adapter(gm, "sum")
    batch = token_ids()
    with torch.no_grad():
        out = gm(**batch)
    lora_fx.save_adapter(gm, tmp_path / "sum", name="sum")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "sum").eval()
    with torch.no_grad():
        assert_close(loaded(**batch), out, ulps=1000)
    folded = lora_fx.merge_lora(gm, "sum")
    assert lora_fx.graph_diff(lora_fx.capture(model), folded).identical
    assert_close(folded(**batch), out, ulps=1000)


def test_combine_refusals(pair):
    model, gm, _ = pair
    lora_fx.add_adapter(gm, "small", TARGETS, rank=2)
    before = set(gm.lora_state.adapters)
    cases = [
        (dict(adapters={"a": 1, "small": 1}, method="linear"), "same rank.*'a': 4, 'small': 2.*'cat' or 'svd'"),
        (dict(adapters={"a": 1, "b": 1}, method="ties"), r"density .* must be in \(0, 1\], got None"),
        (dict(adapters={"a": 1, "b": 1}, method="dare_linear", density=1.5), r"must be in \(0, 1\], got 1.5"),
        (dict(adapters={"a": 1, "b": 1}, method="dare_linear", density=0), r"must be in \(0, 1\], got 0"),
        (dict(adapters={"a": 1, "b": 1}, method="average"), "one of PEFT's combination types"),
        (dict(adapters={"a": 1, "nope": 1}, method="svd"), "no adapter named 'nope'"),
        (dict(adapters={"a": 1, "b": 1}, method="ties", density=0.5, majority_sign_method="vote"), "'total' or 'frequency'"),
        (dict(adapters={"a": float("nan")}, method="svd"), "finite weights"),
        (dict(adapters={"a": 1}, method="svd", name="b"), "adapter 'b' exists"),
    ]
    for kw, message in cases:
        kw = {"name": "new", **kw}
        with pytest.raises((lora_fx.ConfigError, lora_fx.AdapterNameError), match=message):
            lora_fx.combine_adapters(gm, kw.pop("adapters"), kw.pop("name"), **kw)
    assert set(gm.lora_state.adapters) == before
    lora_fx.combine_adapters(gm, {"a": 1, "small": 1}, "mixed", "svd")  # other ranks: the SVD methods take them
    assert set(gm.lora_state.adapters["mixed"].ranks.values()) == {4}
