"""Bad input to the public entry points, one table (as PEFT's tests/test_custom_models.py): each row
makes one bad call on graphs, exports and a server built once for the module, and every row goes
through the same battery: the error has the row's type, its message names the problem and the fix,
and afterwards nothing changed (weights, adapters, the optimizer, the server, the files on disk)."""
from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import BertConfig, BertModel

import export
import export.cli
import lora_fx
from helpers import assert_unchanged, randomize_lora, snapshot, tiny_gpt2, tiny_llama, token_ids


class CliExit(Exception):
    """What the CLI did on a bad argument, as an exception the table can match: its exit code and
    its one line of stderr."""


def cli(*argv: str) -> None:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = export.cli.main(list(argv))
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and "Traceback" not in err.getvalue(), f"stderr is not one line: {err.getvalue()!r}"
    raise CliExit(f"exit {rc}: {lines[0]}")


class World:
    """Everything the rows call into, built once."""

    def __init__(self, d: Path):
        self.dir = d
        self.ids = token_ids()["input_ids"]
        self.base = lora_fx.capture(tiny_llama(), token_ids())
        gm = lora_fx.inject_lora(self.base, ["q_proj", "v_proj"], rank=4, adapter="a")
        randomize_lora(gm, seed=1)
        lora_fx.add_adapter(gm, "b", rank=2, alpha=4)
        lora_fx.set_adapter(gm, "b")
        randomize_lora(gm, seed=2)
        lora_fx.set_adapter(gm, "a")
        self.gm = gm.eval()
        self.folded = lora_fx.merge_lora(gm)
        self.dora = lora_fx.inject_lora(self.base, ["q_proj"], rank=2, use_dora=True)
        self.rank8 = lora_fx.inject_lora(self.base, ["q_proj", "v_proj"], rank=8)
        self.k_proj = lora_fx.inject_lora(self.base, ["k_proj"], rank=4)
        self.bert = lora_fx.inject_lora(
            BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 vocab_size=64)).eval(), ["query"], rank=2, example_inputs=token_ids())

        # the multi-adapter export, an adapter for it, and a server with that adapter loaded
        self.model_path = export.export_multi_adapter(gm, d / "model.onnx")
        self.adapter_path = export.export_adapter(gm, d / "a.onnx_adapter", self.model_path, name="a")
        self.server = export.AdapterServer(self.model_path, device="cpu")
        self.server.load("a", self.adapter_path)
        self.served = self._serve()
        # an .onnx_adapter of the same names, one of another shape (written for another model)
        params = {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(self.adapter_path)).get_parameters().items()}
        first = min(params)
        params[first] = np.zeros((params[first].shape[0], 2 * params[first].shape[1]), dtype=np.float32)
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
        fmt.export_adapter(str(d / "other-model.onnx_adapter"))

        # checkpoints: GPT-2's (another model), a meta-built llama to fill, a loaded graph with an optimizer
        self.gpt2_dir = d / "gpt2"
        tiny_gpt2().save_pretrained(self.gpt2_dir)
        (d / "empty").mkdir()
        (d / "notes.txt").write_text("not a model\n")
        (d / "notes.onnx").write_text("not a model\n")  # the right suffix, the wrong contents
        (d / "notes.pt2").write_text("not a model\n")
        self.mixed = lora_fx.mixed_adapters(gm, ["a", "b"])
        with torch.device("meta"):
            meta = tiny_llama()
        self.meta = lora_fx.inject_lora(meta, ["q_proj", "v_proj"], rank=4, example_inputs=token_ids())
        self.trained = lora_fx.inject_lora(self.base, ["q_proj", "v_proj"], rank=4)
        self.optimizer = torch.optim.AdamW([p for p in self.trained.parameters() if p.requires_grad], lr=1e-2)
        self.trained(**token_ids()).logits.square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def _serve(self) -> np.ndarray:
        return self.server.run({"input_ids": self.ids.numpy()}, adapter="a")[0]

    def modules(self) -> dict:
        return {"gm": self.gm, "folded": self.folded, "dora": self.dora, "rank8": self.rank8,
                "k_proj": self.k_proj, "bert": self.bert, "trained": self.trained, "mixed": self.mixed}

    def state(self) -> dict:
        """What no row may change, except module weights (`snapshot` / `assert_unchanged`)."""
        files = {str(p.relative_to(self.dir)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
                 for p in sorted(self.dir.rglob("*"))}
        optim = self.optimizer.state_dict()
        return {
            "files": files,
            "adapters": {n: lora_fx.lora_state_dict(self.gm, n) for n in ("a", "b")},
            "active": lora_fx.active_adapters(self.gm),
            "meta": {n: (p.is_meta, tuple(p.shape)) for n, p in self.meta.named_parameters()},
            "meta_lora": lora_fx.lora_state_dict(self.meta),
            "optimizer": (optim["param_groups"], {k: {s: v.clone() for s, v in st.items()}
                                                  for k, st in optim["state"].items()}),
            "server": sorted(self.server.adapters),
        }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("bad_input"))


def never_called(ids, mask, pos, past):
    raise AssertionError("generate_with ran the step before checking its arguments")


# (id, bad call, error type, regex the message must match: the problem, then the fix)
CASES = [
    # generation: sampling arguments are checked before the decoding step is captured or run
    ("generate-temperature-zero", lambda w: w.gm.generate(w.ids, 3, do_sample=True, temperature=0),
     lora_fx.ConfigError, r"temperature must be a positive number, got 0"),
    ("generate-top-p-above-one", lambda w: w.gm.generate(w.ids, 3, do_sample=True, top_p=1.5),
     lora_fx.ConfigError, r"top_p must be in \(0, 1\] or None, got 1\.5"),
    ("generate-top-p-zero", lambda w: w.gm.generate(w.ids, 3, do_sample=True, top_p=0),
     lora_fx.ConfigError, r"top_p must be in \(0, 1\] or None, got 0"),
    ("generate-top-k-zero", lambda w: w.gm.generate(w.ids, 3, do_sample=True, top_k=0),
     lora_fx.ConfigError, r"top_k must be a positive int or None, got 0"),
    ("generate-max-new-tokens-zero", lambda w: w.gm.generate(w.ids, 0),
     lora_fx.ConfigError, r"max_new_tokens must be a positive int, got 0"),
    ("generate-1d-input-ids", lambda w: w.gm.generate(w.ids[0], 3),
     lora_fx.InputsError, r"input_ids must be a \[batch, sequence\] tensor of token ids, got torch\.Size\(\[7\]\)"),
    ("generate-empty-prompt", lambda w: w.gm.generate(w.ids[:, :0], 3),
     lora_fx.InputsError, r"input_ids is empty: give at least one prompt token"),
    ("generate-past-the-positions", lambda w: w.gm.generate(w.ids, 100_000),
     lora_fx.InputsError, r"100007 tokens, more than the model's 2048 positions; lower max_new_tokens to at most 2041"),
    ("generate-mask-shape", lambda w: w.gm.generate(w.ids, 3, attention_mask=torch.ones(2, 3)),
     lora_fx.InputsError, r"attention_mask \(2, 3\) must have the shape of input_ids \(2, 7\)"),
    ("generate-with-max-new-tokens-bool",
     lambda w: lora_fx.generate_with(never_called, w.ids, None, max_new_tokens=True),
     lora_fx.ConfigError, r"max_new_tokens must be a positive int, got True"),
    ("generate-with-max-new-tokens-negative",
     lambda w: lora_fx.generate_with(never_called, w.ids, None, max_new_tokens=-1),
     lora_fx.ConfigError, r"max_new_tokens must be a positive int, got -1"),
    ("decode-step-of-an-encoder", lambda w: w.bert.decode_step(),
     lora_fx.InputsError, r"BertModel has no KV cache to capture .*: a kv-cache decoder needs a causal LM"),
    # ONNX export and serving
    ("export-onnx-kv-cache-encoder", lambda w: export.export_onnx(w.bert, w.dir / "bert.onnx", kv_cache=True),
     export.ExportError, r"kv_cache=True: BertModel has no KV cache to capture .*needs a causal LM"),
    ("export-onnx-missing-directory", lambda w: export.export_onnx(w.gm, w.dir / "nodir" / "gm.onnx"),
     export.ExportError, r"cannot write .*gm\.onnx: directory .*nodir does not exist; create it first"),
    ("multi-adapter-mixed-negative", lambda w: export.export_multi_adapter(w.gm, w.dir / "m.onnx", mixed=-1),
     export.ExportError, r"mixed must be a number of adapter banks \(0: one adapter per run\), got -1"),
    ("multi-adapter-mixed-str", lambda w: export.export_multi_adapter(w.gm, w.dir / "m.onnx", mixed="2"),
     export.ExportError, r"mixed must be a number of adapter banks \(0: one adapter per run\), got '2'"),
    ("multi-adapter-dora", lambda w: export.export_multi_adapter(w.dora, w.dir / "m.onnx"),
     export.ExportError, r"q_proj\.weight'\] carry DoRA adapters.*Fold each DoRA adapter \(merge_lora\) and export it"),
    ("multi-adapter-folded", lambda w: export.export_multi_adapter(w.folded, w.dir / "m.onnx"),
     export.ExportError, r"export_multi_adapter needs an unfolded LoRA graph \(inject_lora or load_adapter's result\)"),
    ("export-adapter-larger-rank", lambda w: export.export_adapter(w.rank8, w.dir / "r8.onnx_adapter", w.model_path),
     export.ExportError, (r"has rank 8 but the served model's slot holds 4; export the model from a graph whose "
                          r"largest adapter rank is at least this one")),
    ("export-adapter-other-targets", lambda w: export.export_adapter(w.k_proj, w.dir / "k.onnx_adapter", w.model_path),
     export.ExportError, r"k_proj\.lora_A\.weight has no slot in .*model\.onnx: it targets other modules than the served model"),
    ("export-adapter-unknown-name",
     lambda w: export.export_adapter(w.gm, w.dir / "n.onnx_adapter", w.model_path, name="nope"),
     lora_fx.AdapterNameError, r"no adapter named 'nope'; this graph has \['a', 'b'\]\. Add one with lora_fx\.add_adapter"),
    ("server-run-unknown-adapter", lambda w: w.server.run({"input_ids": w.ids.numpy()}, adapter="nope"),
     lora_fx.AdapterNameError, r"no adapter 'nope' loaded; loaded: \['a'\]\. Load it first with server\.load"),
    ("server-run-unknown-adapter-torch", lambda w: w.server.run({"input_ids": w.ids}, adapter="nope"),
     lora_fx.AdapterNameError, r"no adapter 'nope' loaded; loaded: \['a'\]\. Load it first with server\.load"),
    ("server-load-file-of-another-model", lambda w: w.server.load("other", w.dir / "other-model.onnx_adapter"),
     export.ExportError, (r"lora_A\.weight is \(4, 64\) and does not fit the served model, which takes \(4, 32\): "
                          r"an adapter for another base model, or written for another export\?")),
    ("server-generate-without-kv-cache", lambda w: w.server.generate(w.ids, adapter="a", max_new_tokens=2),
     lora_fx.InputsError, (r"not exported with its KV cache by lora-fx: export it with export\.export_onnx\(model, path, "
                           r"kv_cache=True\)")),
    # adapters: mixing, folding, analysis
    ("mixed-adapters-unknown-name", lambda w: lora_fx.mixed_adapters(w.gm, ["a", "nope"]),
     lora_fx.AdapterNameError, r"cannot mix adapters \['a', 'nope'\]: no adapter named 'nope'; this graph has \['a', 'b'\]"),
    ("mixed-adapters-no-names", lambda w: lora_fx.mixed_adapters(w.gm, []),
     lora_fx.ConfigError, r"name the adapters to mix, e\.g\. \['a', 'b'\], or give a number of empty banks"),
    ("merge-lora-unknown-adapter", lambda w: lora_fx.merge_lora(w.gm, "nope"),
     lora_fx.AdapterNameError, r"cannot fold adapters \['nope'\]: no adapter named 'nope'.*Add one with lora_fx\.add_adapter"),
    ("merge-lora-unknown-weighted-adapter", lambda w: lora_fx.merge_lora(w.gm, {"a": 0.5, "nope": 0.5}),
     lora_fx.AdapterNameError, r"no adapter named 'nope'; this graph has \['a', 'b'\]"),
    ("set-adapter-unknown", lambda w: lora_fx.set_adapter(w.gm, "nope"),
     lora_fx.AdapterNameError, r"no adapter named 'nope'; this graph has \['a', 'b'\]\. Add one with lora_fx\.add_adapter"),
    ("analysis-site-table-unknown-adapter", lambda w: lora_fx.analysis.site_table(w.gm, "nope"),
     lora_fx.AdapterNameError, r"no adapter named 'nope'; this graph has \['a', 'b'\]\. Add one with lora_fx\.add_adapter"),
    ("inject-target-parameters-not-a-parameter",
     lambda w: lora_fx.inject_lora(w.base, None, rank=2, target_parameters=["nope_param"]),
     lora_fx.TargetError, r"'nope_param': matches no module path.*Pass names from that list"),
    ("unflatten-folded-graph", lambda w: lora_fx.unflatten(w.folded),
     lora_fx.TargetError, (r"unflatten needs a graph with unfolded LoRA \(what inject_lora or load_adapter returns\); "
                           r"got a folded graph")),
    # the CLI: exit 2 and one line on stderr
    ("cli-diff-missing-file", lambda w: cli("diff", str(w.dir / "missing.onnx"), str(w.model_path)),
     CliExit, r"^exit 2: lora-fx diff: no such file: .*missing\.onnx$"),
    ("cli-diff-not-onnx", lambda w: cli("diff", str(w.dir / "notes.txt"), str(w.dir / "notes.txt")),
     CliExit, (r"^exit 2: lora-fx diff: compare two \.onnx files or two \.pt2 graphs \(lora_fx\.save_graph\); "
               r"got \.txt and \.txt$")),
    ("cli-analyze-missing-folder", lambda w: cli("analyze", str(w.dir / "missing")),
     CliExit, (r"^exit 2: lora-fx analyze: error: AdapterFileError: no adapter folder at .*missing "
               r"\(--debug shows the traceback\)$")),
    ("cli-analyze-not-an-adapter", lambda w: cli("analyze", str(w.dir / "empty")),
     CliExit, r"^exit 2: lora-fx analyze: error: AdapterFileError: .*empty has no adapter_model\.safetensors"),
    # checkpoints
    ("load-base-checkpoint-of-another-model", lambda w: lora_fx.load_base(w.meta, w.gpt2_dir),
     lora_fx.CheckpointError, (r"model\.embed_tokens\.weight \(\(64, 32\)\) is not in the checkpoint .*nearest names: "
                               r"\['transformer\..*Is it this model's checkpoint, saved with the same module names\?")),
    ("load-base-no-checkpoint", lambda w: lora_fx.load_base(w.meta, w.dir / "empty"),
     lora_fx.CheckpointError, (r"no checkpoint at .*empty: expected a \.safetensors file, or a folder with "
                               r"model\.safetensors\.index\.json or model\.safetensors \(model\.save_pretrained")),
    ("load-base-not-safetensors", lambda w: lora_fx.load_base(w.meta, w.dir / "notes.txt"),
     lora_fx.CheckpointError, r"notes\.txt is not a readable safetensors file"),
    ("load-base-graph-with-weights", lambda w: lora_fx.load_base(w.trained, w.gpt2_dir),
     lora_fx.CheckpointError, (r"nothing to load: no tensor of this graph is on the meta device \(load_base fills a graph "
                               r"captured from a model built under torch\.device\('meta'\)\)")),
    ("load-checkpoint-not-a-training-checkpoint", lambda w: lora_fx.load_checkpoint(w.gpt2_dir, w.trained, w.optimizer),
     lora_fx.CheckpointError, (r"gpt2 is not a whole lora-fx training checkpoint: lora_fx_checkpoint\.json is missing .*"
                               r"Resume from an earlier checkpoint")),
    # found by this table, fixed: each got a raw error (or silently served the wrong adapter) before
    ("generate-float-input-ids", lambda w: w.gm.generate(w.ids.float(), 3),
     lora_fx.InputsError, r"input_ids must hold integer token ids, got torch\.float32: pass the tokenizer's ids"),
    ("mixed-index-out-of-range", lambda w: w.mixed(input_ids=w.ids, adapter_index=torch.tensor([5, 0])),
     lora_fx.InputsError, r"adapter_index 5 is out of range: each row's entry is one of \['a', 'b'\] by position, or -1"),
    ("mixed-index-below-minus-one", lambda w: w.mixed(input_ids=w.ids, adapter_index=torch.tensor([-2, 0])),
     lora_fx.InputsError, r"adapter_index -2 is out of range"),
    ("mixed-index-wrong-length", lambda w: w.mixed(input_ids=w.ids, adapter_index=torch.tensor([0, 1, 1])),
     lora_fx.InputsError, r"adapter_index must be an integer tensor with one entry per row \(2 rows\), got torch\.int64 "
                          r"of shape \(3,\)"),
    ("mixed-index-float", lambda w: w.mixed(input_ids=w.ids, adapter_index=torch.tensor([0.0, 1.0])),
     lora_fx.InputsError, r"adapter_index must be an integer tensor .* got torch\.float32"),
    ("save-graph-missing-folder", lambda w: lora_fx.save_graph(w.gm, w.dir / "nodir" / "g.pt2"),
     lora_fx.InputsError, r"cannot save the graph to .*g\.pt2: directory .*nodir does not exist; create it first"),
    ("load-graph-not-a-graph", lambda w: lora_fx.load_graph(w.dir / "notes.pt2"),
     lora_fx.InputsError, r"notes\.pt2 is not a saved graph .*save one with lora_fx\.save_graph\(gm, path\)"),
    ("load-graph-missing", lambda w: lora_fx.load_graph(w.dir / "missing.pt2"),
     lora_fx.InputsError, r"no saved graph at .*missing\.pt2 \(lora_fx\.save_graph writes a \.pt2 file\)"),
    ("multi-adapter-missing-folder", lambda w: export.export_multi_adapter(w.gm, w.dir / "nodir" / "m.onnx"),
     export.ExportError, r"cannot write .*m\.onnx: directory .*nodir does not exist; create it first"),
    ("export-adapter-missing-model",
     lambda w: export.export_adapter(w.gm, w.dir / "x.onnx_adapter", w.dir / "missing.onnx", name="a"),
     export.ExportError, r"no model at .*missing\.onnx: give the multi-adapter model .*export_multi_adapter writes it"),
    ("server-load-missing-file", lambda w: w.server.load("x", w.dir / "missing.onnx_adapter"),
     export.ExportError, r"no adapter file at .*missing\.onnx_adapter: write one with export\.export_adapter"),
    ("server-load-not-an-adapter", lambda w: w.server.load("x", w.dir / "notes.txt"),
     export.ExportError, r"notes\.txt is not an \.onnx_adapter file .*write one with export\.export_adapter"),
    ("cli-diff-onnx-suffix-not-onnx", lambda w: cli("diff", str(w.dir / "notes.onnx"), str(w.model_path)),
     CliExit, r"^exit 2: .*notes\.onnx is not an ONNX model .*pass \.onnx files"),
    ("load-checkpoint-missing-folder", lambda w: lora_fx.load_checkpoint(w.dir / "missing", w.trained, w.optimizer),
     lora_fx.CheckpointError, r"no training checkpoint at .*missing \(lora_fx\.save_checkpoint writes a folder\)"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(world, call, error, message):
    assert issubclass(error, (lora_fx.LoraFxError, CliExit))
    snaps = {name: snapshot(m) for name, m in world.modules().items()}
    before = world.state()
    with pytest.raises(error, match=message) as raised:
        call(world)
    assert type(raised.value) is error, type(raised.value)
    for name, m in world.modules().items():
        assert_unchanged(m, snaps[name])
    after = world.state()
    for key in before:
        assert same(before[key], after[key]), f"{key} changed"
    assert np.array_equal(world._serve(), world.served), "the server's output with adapter 'a' changed"


def test_ids_are_unique():
    assert len({c[0] for c in CASES}) == len(CASES)
