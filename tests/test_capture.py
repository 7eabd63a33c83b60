"""capture(): inputs, signatures, shapes, modes, and re-capture for other inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from helpers import assert_close, assert_unchanged, max_abs, snapshot, tiny_llama, token_ids


def test_inputs_built_from_config_and_output_type_kept():
    model = tiny_llama()
    gm = lora_fx.capture(model)
    ids = token_ids(3, 9)["input_ids"]
    out = gm(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert type(out) is type(model(input_ids=ids))
    assert max_abs(out, model(input_ids=ids, attention_mask=torch.ones_like(ids))) == 0
    assert not gm.training


def test_sliced_batch_as_example_then_ordinary_tensors():
    model = tiny_llama()
    batch = token_ids(8, 16)["input_ids"]
    gm = lora_fx.capture(model, {"input_ids": batch[:2]})  # a view: torch.export would guard on its base
    fresh = token_ids(5, 12, seed=1)["input_ids"]
    assert max_abs(gm(input_ids=fresh), model(input_ids=fresh)) == 0
    assert max_abs(gm(input_ids=batch[2:6]), model(input_ids=batch[2:6])) == 0


def test_positional_and_keyword_calls_agree():
    model = tiny_llama()
    ids = token_ids()["input_ids"]
    gm = lora_fx.capture(model, (ids,))
    assert max_abs(gm(ids), gm(input_ids=ids)) == 0
    assert len(gm.variants) == 0  # both bind to the same captured input


def test_undeclared_input_rejected_even_with_kwargs():
    model = tiny_llama()
    snap = snapshot(model)
    ids = token_ids()["input_ids"]
    with pytest.raises(lora_fx.InputsError, match=r"declares no input named \['input_idz'\].*did you mean 'input_ids'"):
        lora_fx.capture(model, {"input_idz": ids})
    with pytest.raises(lora_fx.InputsError, match="do not fit"):
        lora_fx.capture(model, (ids,) * 40)
    with pytest.raises(lora_fx.InputsError, match="must be a tuple"):
        lora_fx.capture(model, 3)
    assert_unchanged(model, snap)


def test_plain_module_without_inputs_asks_for_them():
    with pytest.raises(lora_fx.InputsError, match="needs example inputs"):
        lora_fx.capture(nn.Linear(4, 4))


def test_data_dependent_control_flow_is_a_clear_capture_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # depends on values: torch.export cannot capture it
                return self.lin(x)
            return -self.lin(x)

    model = Branchy().train()
    snap = snapshot(model)
    with pytest.raises(lora_fx.CaptureError, match=r"(?s)could not capture Branchy.*GuardOnDataDependent.*What to try.*torch.cond"):
        lora_fx.capture(model, (torch.randn(2, 4),))
    assert_unchanged(model, snap)
    assert model.training


def test_capture_restores_config_and_modes():
    model = tiny_llama(use_cache=True)
    model.train()
    model.model.layers[0].eval()  # a mixed-mode model stays mixed
    modes = {n: m.training for n, m in model.named_modules()}
    gm = lora_fx.capture(model)
    assert model.config.use_cache is True
    assert {n: m.training for n, m in model.named_modules()} == modes
    ids = token_ids(2, 5)["input_ids"]
    assert max_abs(gm(input_ids=ids, attention_mask=torch.ones_like(ids)), model.eval()(input_ids=ids)) == 0


def test_parameters_are_the_models_own():
    model = tiny_llama()
    gm = lora_fx.capture(model)
    for name, p in model.named_parameters():
        assert gm.get_parameter(name) is p


def test_other_inputs_are_captured_on_the_fly():
    model = tiny_llama()
    ids = token_ids()["input_ids"]
    gm = lora_fx.capture(model, {"input_ids": ids})
    out = gm(input_ids=ids, labels=ids)  # labels were not in the capture
    assert_close(out.loss, model(input_ids=ids, labels=ids).loss, ulps=10)
    assert len(gm.variants) == 1
    gm(input_ids=ids, labels=ids, attention_mask=None)  # None at its default is not an input
    assert len(gm.variants) == 1


def test_other_inputs_without_source_model_fail_clearly():
    model = tiny_llama()
    ids = token_ids()["input_ids"]
    gm = lora_fx.capture(model, {"input_ids": ids})
    gm.capture_info.source = None
    with pytest.raises(lora_fx.InputsError, match=r"captured with inputs \['input_ids'\].*labels.*example_inputs="):
        gm(input_ids=ids, labels=ids)


def test_unknown_call_input_is_rejected():
    model = tiny_llama()
    gm = lora_fx.capture(model)
    with pytest.raises(lora_fx.InputsError, match="not declared"):
        gm(input_ids=torch.zeros(2, 3, dtype=torch.long), foo=1)


def test_plain_function_module_with_f_linear():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))

        def forward(self, x):
            return F.linear(x, self.w).relu()

    m = M()
    gm = lora_fx.capture(m, (torch.randn(2, 3, 4),))
    x = torch.randn(5, 9, 4)
    assert max_abs(gm(x), m(x)) == 0


def test_images_are_captured_at_their_size_and_another_size_captures_again():
    """Only the batch of an image input is dynamic (symbolic height and width made Swin's capture take
    13 minutes); a call at another size captures the model again."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2))
    gm = lora_fx.capture(net, (torch.randn(2, 3, 16, 16),))
    assert gm.capture_info.fixed_shapes == {"input": (3, 16, 16)}
    for shape in ((5, 3, 16, 16), (2, 3, 24, 20)):
        x = torch.randn(*shape)
        assert max_abs(gm(x), net(x)) == 0
    assert len(gm.variants) == 1


def test_a_recurrent_state_of_tensors_stays_an_output():
    """RWKV returns its recurrent state as plain tensors: the capture keeps it (a KV cache object,
    which torch.export cannot return, is turned off and the notes say so)."""
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    model = RwkvForCausalLM(RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                       intermediate_size=64, context_length=32)).eval()
    ids = token_ids()
    gm = lora_fx.capture(model, ids)
    out, ref = gm(**ids), model(**ids)
    assert len(out.state) == 5 and all(max_abs(a, b) == 0 for a, b in zip(out.state, ref.state))
    assert any("KV cache is off" in n for n in lora_fx.capture(tiny_llama(use_cache=True), ids).capture_info.notes)
