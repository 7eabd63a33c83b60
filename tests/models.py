"""The architecture table every core check runs over: small configs, random weights, no downloads."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

H, LAYERS, HEADS, VOCAB = 32, 2, 4, 96


class HandWritten(nn.Module):
    """Model code nobody wrapped in nn.Linear: F.linear on its own parameters, two per module."""

    def __init__(self, d=H, hidden=48):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.mixer = nn.Module()
        self.mixer.w_in = nn.Parameter(torch.randn(hidden, d) / d**0.5)
        self.mixer.b_in = nn.Parameter(torch.zeros(hidden))
        self.mixer.w_out = nn.Parameter(torch.randn(d, hidden) / hidden**0.5)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(d, 5)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h + self.drop(F.linear(F.gelu(F.linear(h, self.mixer.w_in, self.mixer.b_in)), self.mixer.w_out))
        return self.head(h.mean(1))


class ConvNet(nn.Module):
    """A ResNet-style block and every other conv: strided 5x5, dilated, grouped, padding="same",
    1x1, Conv1d and Conv3d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 5, stride=2, padding=2)
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.same = nn.Conv2d(16, 16, 3, padding="same", bias=False)
        self.point = nn.Conv2d(16, 8, 1)
        self.seq = nn.Conv1d(8, 8, 3, stride=2)
        self.vol = nn.Conv3d(1, 4, (1, 3, 3), padding=(0, 1, 1))
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(12, 5)

    def forward(self, pixel_values):
        h = F.relu(self.stem(pixel_values))
        h = h + self.drop(F.relu(self.dilated(h)))  # the residual block
        h = h + self.grouped(h)
        h = self.point(F.relu(self.same(h)))
        s = self.seq(h.mean(2))
        v = self.vol(h[:, :1].unsqueeze(1))
        return self.head(torch.cat([s.mean(-1), v.mean((2, 3, 4))], -1))


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    targets: Any
    peft: dict | None = None  # LoraConfig kwargs where PEFT supports the same targets
    trainable: tuple = ()
    inputs: str = "tokens"  # "tokens" | "pixels" | "sequence" | "latents"
    has_dropout: bool = True
    expect: dict = field(default_factory=dict)  # rewritten-use counters the pass must report
    causal: bool = False  # a decoder-only causal LM: generates with a KV cache
    parameters: tuple | None = None  # target_parameters (MoE expert stacks)
    onnx: bool = True  # torch's ONNX exporter handles the model
    dora: bool = False  # inject with use_dora
    lora_bias: bool = False  # inject with lora_bias

    def batch(self, model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        if self.inputs == "pixels":
            return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
        if self.inputs == "sequence":
            return {"src": torch.randn(batch, seq, H, generator=g)}
        if self.inputs == "latents":  # a diffusion UNet's denoising step: latents, time, text states
            return {"sample": torch.randn(batch, 4, 8, 8, generator=g), "timestep": torch.tensor(10),
                    "encoder_hidden_states": torch.randn(batch, seq, H, generator=g)}
        params = inspect.signature(model.forward).parameters
        out = {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}
        if "attention_mask" in params:
            out["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            out["decoder_input_ids"] = torch.randint(0, VOCAB, (batch, max(seq - 2, 2)), generator=g)
        return out


def _hf(cls_name, config_name, **kw):
    def build():
        import transformers

        config = getattr(transformers, config_name)(**kw)
        return getattr(transformers, cls_name)(config)

    return build


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=H,
                                attention_head_dim=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _mha():
    layer = nn.TransformerEncoderLayer(H, HEADS, 2 * H, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)


_decoder = dict(num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB, hidden_size=H,
                intermediate_size=2 * H, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_encoder = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * H,
                vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1, pad_token_id=0)

CASES = [
    Case("llama", _hf("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, attention_dropout=0.1, **_decoder),
         ["q_proj", "v_proj"], peft=dict(target_modules=["q_proj", "v_proj"]), expect={"linear": 4}, causal=True),
    Case("qwen2", _hf("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2, attention_dropout=0.1, **_decoder),
         ["q_proj", "v_proj"], peft=dict(target_modules=["q_proj", "v_proj"]), expect={"linear": 4}, causal=True),
    Case("mistral", _hf("MistralForCausalLM", "MistralConfig", num_key_value_heads=2, attention_dropout=0.1, **_decoder),
         ["q_proj", "v_proj"], peft=dict(target_modules=["q_proj", "v_proj"]), expect={"linear": 4}, causal=True),
    Case("gpt2", _hf("GPT2LMHeadModel", "GPT2Config", n_embd=H, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB,
                     n_positions=64, bos_token_id=1, eos_token_id=2),
         ["c_attn"], peft=dict(target_modules=["c_attn"], fan_in_fan_out=True), expect={"addmm": 2}, causal=True),
    Case("gpt2-qv", _hf("GPT2LMHeadModel", "GPT2Config", n_embd=H, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB,
                        n_positions=64, bos_token_id=1, eos_token_id=2),
         {"c_attn": [True, False, True]}, expect={"addmm": 2}, causal=True),
    Case("gpt-neox", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=H, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, intermediate_size=2 * H, vocab_size=VOCAB,
                         attention_dropout=0.1, hidden_dropout=0.1, bos_token_id=1, eos_token_id=2),
         ["query_key_value"], peft=dict(target_modules=["query_key_value"]), expect={"linear": 2}, causal=True),
    Case("falcon", _hf("FalconForCausalLM", "FalconConfig", hidden_size=H, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, vocab_size=VOCAB, attention_dropout=0.1, hidden_dropout=0.1,
                       bos_token_id=1, eos_token_id=2),
         ["query_key_value"], peft=dict(target_modules=["query_key_value"]), expect={"matmul": 2}, causal=True),
    Case("bert", _hf("BertForSequenceClassification", "BertConfig", **_encoder),
         ["query", "value"], peft=dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
         trainable=("classifier",), expect={"linear": 4}),
    Case("roberta", _hf("RobertaForSequenceClassification", "RobertaConfig", **{**_encoder, "pad_token_id": 1}),
         ["query", "value"], peft=dict(target_modules=["query", "value"]), expect={"linear": 4}),
    Case("distilbert", _hf("DistilBertForSequenceClassification", "DistilBertConfig", dim=H, hidden_dim=2 * H,
                           n_layers=LAYERS, n_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=64,
                           dropout=0.1, attention_dropout=0.1, pad_token_id=0),
         ["q_lin", "v_lin"], peft=dict(target_modules=["q_lin", "v_lin"]), expect={"linear": 4}),
    Case("bart", _hf("BartForConditionalGeneration", "BartConfig", d_model=H, encoder_layers=LAYERS,
                     decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                     encoder_ffn_dim=2 * H, decoder_ffn_dim=2 * H, vocab_size=VOCAB, max_position_embeddings=64,
                     dropout=0.1, attention_dropout=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     decoder_start_token_id=2, forced_eos_token_id=None),
         ["q_proj", "v_proj"], peft=dict(target_modules=["q_proj", "v_proj"]), expect={"linear": 12}),
    Case("t5", _hf("T5ForConditionalGeneration", "T5Config", d_model=H, d_ff=2 * H, num_layers=LAYERS,
                   num_heads=HEADS, d_kv=H // HEADS, vocab_size=VOCAB, dropout_rate=0.1, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1),
         ["q", "v"], peft=dict(target_modules=["q", "v"]), expect={"linear": 12}),
    Case("vit", _hf("ViTForImageClassification", "ViTConfig", hidden_size=H, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, intermediate_size=2 * H, image_size=32, patch_size=8,
                    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=3),
         ["q_proj", "v_proj"], peft=dict(target_modules=["q_proj", "v_proj"]), inputs="pixels", expect={"linear": 4}),
    Case("mha-qv", _mha, {"self_attn": [True, False, True]}, inputs="sequence", expect={"linear": 2}),
    # "self_attn" adapts in_proj and out_proj, as PEFT does; but PEFT's out_proj update is off by
    # O(1) against W + s*B@A (peft 0.21.2, measured), so this row is checked against the definition only.
    Case("mha", _mha, ["self_attn"], inputs="sequence", expect={"linear": 4}),
    Case("hand-written", HandWritten, ["w_in", "w_out"], trainable=("head",), expect={"linear": 2}),
    # convolutions: PEFT's conv branch where the conv is not grouped; a grouped conv's weight gets
    # the update (PEFT's grouped LoRA is another function, which it cannot merge); PEFT drops a
    # conv's dilation from its lora_A (a PEFT bug), so PEFT's own row leaves the dilated conv out
    Case("conv", ConvNet, ["stem", "dilated", "grouped", "same", "point", "seq", "vol"], inputs="pixels",
         expect={"conv": 6, "weight": 1}),
    Case("conv-peft", ConvNet, ["stem", "same", "point", "seq", "vol"], inputs="pixels",
         peft=dict(target_modules=["stem", "same", "point", "seq", "vol"]), expect={"conv": 5}),
    Case("llama-embedding", _hf("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, attention_dropout=0.1,
                                tie_word_embeddings=False, **_decoder),
         ["embed_tokens", "v_proj"], peft=dict(target_modules=["embed_tokens", "v_proj"]),
         expect={"embedding": 1, "linear": 2}, causal=True),
    # DoRA: linear, embedding, conv (PEFT's rows); a grouped conv's weight (lora-fx only)
    Case("llama-dora", _hf("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, tie_word_embeddings=False,
                           **_decoder),
         ["embed_tokens", "q_proj", "v_proj"], peft=dict(target_modules=["embed_tokens", "q_proj", "v_proj"], use_dora=True),
         expect={"embedding": 1, "linear": 4}, has_dropout=False, dora=True),
    Case("conv-dora", ConvNet, ["stem", "same", "point", "seq", "vol"], inputs="pixels",
         peft=dict(target_modules=["stem", "same", "point", "seq", "vol"], use_dora=True), expect={"conv": 5}, dora=True),
    Case("conv-dora-grouped", ConvNet, ["grouped", "dilated"], inputs="pixels", expect={"conv": 1, "weight": 1}, dora=True),
    # PEFT's lora_bias: a bias on lora_B, folded into the layer's bias
    Case("bert-lora-bias", _hf("BertForSequenceClassification", "BertConfig", **_encoder),
         ["query", "value"], peft=dict(target_modules=["query", "value"], lora_bias=True), expect={"linear": 4},
         lora_bias=True),
    Case("conv-lora-bias", ConvNet, ["stem", "point", "seq", "vol"], inputs="pixels",
         peft=dict(target_modules=["stem", "point", "seq", "vol"], lora_bias=True), expect={"conv": 4}, lora_bias=True),
    # a diffusion UNet (diffusers): attention projections and the resnets' convs
    Case("unet", _unet, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], inputs="latents",
         peft=dict(target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]), has_dropout=False,
         expect={"conv": 16, "linear": 32}),
    # MoE experts (transformers 5: 3-D stacks): Mixtral through the default grouped-mm op, which
    # torch's ONNX exporter cannot translate; Qwen3-MoE and gpt-oss ([E, in, out] storage, bias
    # stacks) through "batched_mm" (index + bmm), which exports
    Case("mixtral", _hf("MixtralForCausalLM", "MixtralConfig", num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, **_decoder),
         ["q_proj"], parameters=("experts.gate_up_proj", "experts.down_proj"),
         peft=dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
         expect={"linear": 2, "weight": 4}, has_dropout=False, onnx=False),
    Case("qwen3-moe", _hf("Qwen3MoeForCausalLM", "Qwen3MoeConfig", num_key_value_heads=2, num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=H, decoder_sparse_step=1, mlp_only_layers=[],
                          experts_implementation="batched_mm", **_decoder),
         None, parameters=("gate_up_proj", "down_proj"),
         peft=dict(target_modules=[], target_parameters=["gate_up_proj", "down_proj"]),
         expect={"weight": 4}, has_dropout=False),
    Case("gpt-oss", _hf("GptOssForCausalLM", "GptOssConfig", num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                        experts_implementation="batched_mm", **{**_decoder, "intermediate_size": H}),
         None, parameters=("gate_up_proj", "down_proj"),
         peft=dict(target_modules=[], target_parameters=["gate_up_proj", "down_proj"]),
         expect={"weight": 4}, has_dropout=False),
]
