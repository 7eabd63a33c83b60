"""What a decoder exported with its KV cache looks like from outside: input and output names (the
ones optimum and ONNX Runtime GenAI use), the facts a generation loop needs (kept in the ONNX file's
metadata), and the `genai_config.json` that lets onnxruntime-genai run the file."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch

import lora_fx

META_KEY = "lora_fx.kv_cache"
GENAI_CONFIG = "genai_config.json"


@dataclass
class KvCache:
    """A decoding step's cache and tokens, as the ONNX file records them."""

    layers: int
    kv_heads: list[int]  # per layer
    head_dims: list[int]  # per layer
    dtype: str  # of the cache, e.g. "float32"
    position_ids: bool  # whether the step takes position_ids
    max_positions: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    bos_token_id: int | None

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        """The cache of no tokens yet, flat in input order (key, value per layer), on the CPU."""
        dtype = getattr(torch, self.dtype)
        return [torch.zeros(batch, h, 0, d, dtype=dtype) for h, d in zip(self.kv_heads, self.head_dims)
                for _ in ("key", "value")]


def input_names(step: lora_fx.LoraGraphModule) -> list[str]:
    """Flat input names of a decoding step, in its order: input_ids, attention_mask, position_ids
    (if taken), past_key_values.{i}.key / .value (and adapter_index for a mixed-adapter step)."""
    names = []
    for name in step.capture_info.input_names:
        if name == "past_key_values":
            for i in range(len(step.capture_info.example_inputs[name])):
                names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        else:
            names.append(name)
    return names


def output_names(step: lora_fx.LoraGraphModule) -> list[str]:
    """logits, then present.{i}.key / .value."""
    names = ["logits"]
    for i in range(len(step.capture_info.example_inputs["past_key_values"])):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def describe(step: lora_fx.LoraGraphModule) -> KvCache:
    """The facts of a decoding step a generation loop needs, from its capture and its model's config."""
    past = step.capture_info.example_inputs["past_key_values"]
    model = step.capture_info.source
    eos, pad = lora_fx.special_tokens(model, lora_fx.MODEL_DEFAULT, lora_fx.MODEL_DEFAULT)
    config = getattr(model, "config", None)
    return KvCache(
        layers=len(past), kv_heads=[int(k.shape[1]) for k, _ in past], head_dims=[int(k.shape[3]) for k, _ in past],
        dtype=str(past[0][0].dtype).removeprefix("torch."), position_ids="position_ids" in step.capture_info.input_names,
        max_positions=lora_fx.max_positions(config), eos_token_id=eos, pad_token_id=pad,
        bos_token_id=getattr(getattr(model, "generation_config", None), "bos_token_id", None),
    )


def write_metadata(path: Path, kv: KvCache) -> None:
    """Record `kv` in the ONNX file (metadata_props), next to what is there."""
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    props[META_KEY] = json.dumps(asdict(kv))
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def read_metadata(session_or_path) -> KvCache:
    """The KvCache recorded in a kv-cache export (a path, or an onnxruntime session of one)."""
    if isinstance(session_or_path, (str, Path)):
        props = {p.key: p.value for p in onnx.load(str(session_or_path), load_external_data=False).metadata_props}
    else:
        props = session_or_path.get_modelmeta().custom_metadata_map
    if META_KEY not in props:
        raise lora_fx.InputsError(
            "this ONNX model was not exported with its KV cache by lora-fx: export it with "
            "export.export_onnx(model, path, kv_cache=True) (or export_multi_adapter(..., kv_cache=True))"
        )
    return KvCache(**json.loads(props[META_KEY]))


HF_CONFIGS = ("config.json", "generation_config.json")  # what transformers / optimum read from a model folder


def write_hf_configs(path: Path, step: lora_fx.LoraGraphModule) -> list[Path]:
    """The model's config.json and generation_config.json beside `path`, as transformers writes
    them: what optimum's ORTModelForCausalLM.from_pretrained(folder) reads with the ONNX file."""
    source = step.capture_info.source
    written = []
    for name, config in zip(HF_CONFIGS, (getattr(source, "config", None), getattr(source, "generation_config", None))):
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(path.parent)
            written.append(path.parent / name)
    return written


def write_genai_config(path: Path, step: lora_fx.LoraGraphModule, kv: KvCache) -> Path:
    """genai_config.json beside `path`, so that onnxruntime-genai runs it (one model per folder, as
    onnxruntime-genai expects)."""
    config = step.capture_info.source.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if kv.position_ids:
        inputs["position_ids"] = "position_ids"
    context = kv.max_positions or 2048
    genai = {
        "model": {
            "bos_token_id": kv.bos_token_id, "context_length": context, "eos_token_id": kv.eos_token_id,
            "pad_token_id": kv.pad_token_id if kv.pad_token_id is not None else 0,
            "type": "llama",  # onnxruntime-genai's plain decoder-only runner: standard inputs, as written here
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": path.name, "head_size": kv.head_dims[0], "hidden_size": hidden,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads, "num_hidden_layers": kv.layers, "num_key_value_heads": kv.kv_heads[0],
            },
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
    out = path.parent / GENAI_CONFIG
    out.write_text(json.dumps(genai, indent=2) + "\n")
    return out
