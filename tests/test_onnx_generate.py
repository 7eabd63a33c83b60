"""Generation after deployment, on every decoder row: kv-cache exports (untouched and folded) are the
same graph, ONNX Runtime generates transformers' tokens, onnxruntime-genai runs the files (folded, and
multi-adapter with our .onnx_adapter files), and one session serves several adapters, per row."""
from __future__ import annotations

import json

import pytest
import torch

import export
import lora_fx
from helpers import tiny_llama, token_ids

NEW = 8


def _prompt():
    """Three rows, the first left-padded by 2."""
    ids = token_ids(3, 6, seed=5)["input_ids"].clamp(min=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    return ids, mask


def _hf(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)


def test_folded_kv_export_is_the_untouched_kv_export(decoder, onnx_dir):
    base, folded = decoder.kv_onnx("base", onnx_dir), decoder.kv_onnx("folded", onnx_dir)
    diff = export.onnx_diff(base, folded)
    assert diff.same_structure and diff.same_names, str(diff)
    assert set(diff.changed_initializers) == set(decoder.random_b().lora_state.sites), str(diff)
    names = [i.name for i in export.ort_session(folded).get_inputs()]
    assert names[:2] == ["input_ids", "attention_mask"] and "past_key_values.0.key" in names
    a = export.optimized_model(base, base.parent / "opt.onnx")
    b = export.optimized_model(folded, folded.parent / "opt.onnx")
    assert export.onnx_diff(a, b).same_structure


def test_onnx_runtime_generates_transformers_tokens(decoder, onnx_dir):
    ids, mask = _prompt()
    merged = lora_fx.merge_and_unload(decoder.random_b())
    assert torch.equal(export.generate(decoder.kv_onnx("folded", onnx_dir), ids, NEW, attention_mask=mask),
                       _hf(merged, ids, mask, eos_token_id=None))
    assert torch.equal(export.generate(decoder.kv_onnx("base", onnx_dir), ids, NEW, attention_mask=mask),
                       _hf(decoder.model, ids, mask, eos_token_id=None))
    # eos: the first new token of row 1 ends that row; the others are padded after theirs, as transformers does
    eos = int(_hf(merged, ids, mask, eos_token_id=None)[1, ids.shape[1]])
    ours = export.generate(decoder.kv_onnx("folded", onnx_dir), ids, NEW, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, _hf(merged, ids, mask, eos_token_id=eos))


def _genai_tokens(folder, prompt_row: torch.Tensor, adapter_file=None) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai", reason="make test installs onnxruntime-genai (--no-deps)")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_row.shape[0] + NEW, do_sample=False)
    generator = og.Generator(model, params)
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "x")
        generator.set_active_adapter(adapters, "x")
    generator.append_tokens(prompt_row[None].numpy())
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


def _until_eos(tokens: torch.Tensor, prompt_len: int, eos) -> list[int]:
    """What onnxruntime-genai returns for a greedy run: the prompt and the new tokens before eos."""
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    out = tokens[:prompt_len].tolist()
    for t in tokens[prompt_len:].tolist():
        if t in eos:
            break
        out.append(t)
    return out


def test_onnxruntime_genai_runs_the_exports(decoder, onnx_dir):
    ids, _ = _prompt()
    row = ids[1]  # no padding: onnxruntime-genai takes prompts as token lists
    eos = json.loads((decoder.kv_onnx("folded", onnx_dir).parent / export.GENAI_CONFIG).read_text())["model"]["eos_token_id"]
    ours = export.generate(decoder.kv_onnx("folded", onnx_dir), row[None], NEW)[0]
    assert _genai_tokens(decoder.kv_onnx("folded", onnx_dir).parent, row) == _until_eos(ours, row.shape[0], eos)
    multi = decoder.kv_onnx("multi", onnx_dir)
    for name in ("a", "b"):
        merged = lora_fx.merge_and_unload(decoder.two_adapters(), adapters=name)
        ref = _hf(merged, row[None], torch.ones_like(row[None]), eos_token_id=None)[0]
        assert _genai_tokens(multi.parent, row, multi.parent / f"{name}.onnx_adapter") == _until_eos(ref, row.shape[0], eos)


@pytest.mark.parametrize("kind", ["multi", "mixed", "stacked"])
def test_one_session_generates_for_each_adapter(decoder, onnx_dir, kind):
    path = decoder.kv_onnx(kind, onnx_dir)
    server = export.AdapterServer(path)
    for name in ("a", "b"):
        server.load(name, path.parent / f"{name}.onnx_adapter")
    gm = decoder.two_adapters()
    ids, mask = _prompt()
    ref = {name: _hf(lora_fx.merge_and_unload(gm, adapters=name), ids, mask, eos_token_id=None) for name in ("a", "b")}
    ref[None] = _hf(decoder.model, ids, mask, eos_token_id=None)
    for name in ("a", "b", None):
        assert torch.equal(server.generate(ids, adapter=name, max_new_tokens=NEW, attention_mask=mask), ref[name]), name
    assert not torch.equal(ref["a"], ref["b"])
    rows = ["b", None, "a"]
    if kind != "multi":  # one batch, a different adapter per row, one session run per step
        out = server.generate(ids, adapter=rows, max_new_tokens=NEW, attention_mask=mask)
        for i, name in enumerate(rows):
            assert torch.equal(out[i], ref[name][i]), (i, name)
    else:
        with pytest.raises(export.ExportError, match="one adapter per run.*mixed=k"):
            server.generate(ids, adapter=rows, max_new_tokens=NEW, attention_mask=mask)
    with pytest.raises(lora_fx.AdapterNameError, match="no adapter 'zzz' loaded"):
        server.generate(ids, adapter="zzz", max_new_tokens=NEW)


def test_bad_generation_requests(decoder, onnx_dir, tmp_path):
    path = decoder.kv_onnx("folded", onnx_dir)
    ids, _ = _prompt()
    with pytest.raises(lora_fx.ConfigError, match="max_new_tokens must be a positive int"):
        export.generate(path, ids, 0)
    limit = export.read_metadata(path).max_positions
    with pytest.raises(lora_fx.InputsError, match=f"the prompt has {limit + 1} tokens but the model has {limit} positions"):
        export.generate(path, torch.zeros(1, limit + 1, dtype=torch.long), 1)
    with pytest.raises(lora_fx.InputsError, match="not exported with its KV cache"):
        export.generate(decoder.onnx("folded", onnx_dir), ids, 2)


def test_kv_cache_export_of_a_model_without_a_cache_is_refused(tmp_path):
    from models import CASES

    bert = next(c for c in CASES if c.name == "bert").build()
    with pytest.raises(export.ExportError, match="kv_cache=True: BertForSequenceClassification has no KV cache"):
        export.export_onnx(bert, tmp_path / "bert.onnx", kv_cache=True)
    assert not (tmp_path / "bert.onnx").exists()


def test_an_adapter_for_another_base_is_refused(decoder, onnx_dir, tmp_path):
    from helpers import tiny_llama

    path = decoder.kv_onnx("multi", onnx_dir)
    other = lora_fx.inject_lora(tiny_llama(hidden_size=48, intermediate_size=64), ["q_proj", "v_proj"], rank=2,
                                example_inputs=token_ids())
    with pytest.raises(export.ExportError, match="(has no slot|does not fit the served model)"):
        export.export_adapter(other, tmp_path / "other.onnx_adapter", path)
    server = export.AdapterServer(path)
    server.load("a", path.parent / "a.onnx_adapter")
    foreign = tmp_path / "foreign.onnx_adapter"
    _write_adapter_like(path.parent / "a.onnx_adapter", foreign)
    with pytest.raises(export.ExportError, match="does not fit the served model"):
        server.load("foreign", foreign)
    assert sorted(server.adapters) == ["a"]  # the server is as it was


def _write_adapter_like(src, dst):
    """An .onnx_adapter with the names of `src` but a wrong shape for one of its tensors."""
    import numpy as np
    import onnxruntime as ort

    params = {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(src)).get_parameters().items()}
    key = next(iter(params))
    params[key] = np.zeros(tuple(d + 1 for d in params[key].shape), dtype=params[key].dtype)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(dst))


def test_a_kv_export_folder_carries_the_models_configs(decoder, onnx_dir):
    """config.json and generation_config.json beside the graph, as transformers writes them: what
    optimum's ORTModelForCausalLM.from_pretrained(folder) reads with it."""
    from transformers import AutoConfig, GenerationConfig

    folder = decoder.kv_onnx("folded", onnx_dir).parent
    def described(config):  # what it says about the model, not where it was read from
        return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}

    assert described(AutoConfig.from_pretrained(folder)) == described(decoder.model.config)
    if getattr(decoder.model, "generation_config", None) is not None:
        assert GenerationConfig.from_pretrained(folder).to_dict() == decoder.model.generation_config.to_dict()
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError:
        pytest.skip("optimum is not installed (it pins transformers < 5): the folder's files are checked above")
    ORTModelForCausalLM.from_pretrained(folder)


def _tokenizer():
    """A small fast tokenizer built here (no hub): words of the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(40)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_a_kv_export_folder_carries_the_tokenizer_when_given(tmp_path):
    from transformers import AutoTokenizer

    tok, model = _tokenizer(), tiny_llama()
    text = "w1 w7 w30 nope"
    for kind in ("folded", "stacked"):
        folder = tmp_path / kind
        folder.mkdir()
        if kind == "folded":
            export.export_onnx(model, folder / "model.onnx", kv_cache=True, tokenizer=tok)
        else:
            gm = lora_fx.inject_lora(model, ["q_proj"], rank=2, example_inputs=token_ids())
            export.export_multi_adapter(gm, folder / "model.onnx", kv_cache=True, stacked=True, tokenizer=tok)
        again = AutoTokenizer.from_pretrained(folder)
        assert again(text)["input_ids"] == tok(text)["input_ids"] and again.eos_token == "</s>"
        assert (folder / "config.json").is_file() and not any(p.name.startswith(".") for p in folder.iterdir())
    with pytest.raises(export.ExportError, match=r"tokenizer= is written beside a kv-cache export \(kv_cache=True\)"):
        export.export_onnx(model, tmp_path / "plain.onnx", tokenizer=tok)
    assert not (tmp_path / "plain.onnx").exists() and not (tmp_path / "tokenizer.json").exists()
