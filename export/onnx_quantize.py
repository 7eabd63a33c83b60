"""quantize_onnx: ONNX Runtime's weight-only quantizer (MatMulNBits) over a float export.

The other route to a quantized deployment than exporting LoRA beside a torchao base: fold with
`merge_lora(gm, quantized="dequantize")`, export the float graph with `optimize=True` (so each
linear's weight is a constant the quantizer sees), then quantize its products to 4 (or 8) bits in
blocks, with ONNX Runtime's own tool. LoRA's products (lora_A / lora_B weights) are never quantized.
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

import lora_fx

from .onnx_export import ExportError


def _weight(node: onnx.NodeProto, initializers: set[str]) -> str | None:
    return next((i for i in node.input[1:2] if i in initializers), None)


def quantize_onnx(src, dst, *, bits: int = 4, block_size: int = 32, symmetric: bool = True,
                  weights=None) -> dict[str, int]:
    """Write `src` (a float ONNX export) to `dst` with its MatMuls over constant weights turned into
    ONNX Runtime's MatMulNBits (`bits`-bit blocks of `block_size` along the input). `weights`: a
    predicate on the weight initializer's name choosing which products to quantize (default: all
    but LoRA's). Returns {"quantized": n, "kept": m}: products quantized, and MatMuls left float."""
    if bits not in (4, 8):
        raise ExportError(f"bits={bits}: ONNX Runtime's MatMulNBits takes 4 or 8")
    model = onnx.load(str(src))
    initializers = {i.name for i in model.graph.initializer}
    choose = weights or (lambda name: lora_fx.parse_lora_name(name) is None)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    exclude = [n.name for n in matmuls if (w := _weight(n, initializers)) is None or not choose(w)]
    if len(exclude) == len(matmuls):
        raise ExportError(f"{src} has no MatMul over a constant weight to quantize; export the float graph with "
                          "export_onnx(..., optimize=True), which folds each weight's transpose into a constant")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     nodes_to_exclude=exclude)
    quantizer.process()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    quantizer.model.save_model_to_file(str(dst))
    done = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(dst)).graph.node)
    return {"quantized": done, "kept": len(matmuls) - done}
