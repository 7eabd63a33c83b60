"""ONNX Runtime: sessions on CUDA when there is one, IO binding for torch tensors, optimized graphs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
       torch.int32: np.int32, torch.bool: np.bool_, torch.int8: np.int8, torch.uint8: np.uint8}


def cuda_usable() -> bool:
    """Whether ONNX Runtime's CUDA provider can run here. Listing it is not enough: the CPU machines'
    onnxruntime-gpu lists CUDA and then fails to load libcublas, so also require a CUDA device."""
    return CUDA in ort.get_available_providers() and torch.cuda.is_available()


def ort_session(path, device: str = "auto", *, options=None):
    """An `onnxruntime.InferenceSession` for `path` on CUDA when present (device "auto"), on CUDA or
    an error (device "cuda"), or on CPU (device "cpu"). `session.provider` says what it got."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    want_cuda = device == "cuda" or (device == "auto" and cuda_usable())
    if device == "cuda" and not cuda_usable():
        raise RuntimeError(
            f"device='cuda' but CUDA is not usable by ONNX Runtime here (providers: "
            f"{ort.get_available_providers()}, torch.cuda.is_available()={torch.cuda.is_available()}); "
            "install onnxruntime-gpu matching your CUDA, or use device='auto' / 'cpu'"
        )
    if want_cuda and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # find the CUDA libraries torch's nvidia-* packages ship
    providers = [CUDA, CPU] if want_cuda else [CPU]
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # ORT's constant-folding notices are not the user's problem
    session = ort.InferenceSession(str(path), options, providers=providers)
    session.provider = session.get_providers()[0]
    if device == "cuda" and session.provider != CUDA:
        raise RuntimeError(f"asked for CUDA, ONNX Runtime gave {session.get_providers()}: the CUDA provider failed to load")
    return session


def ort_run(session, inputs: dict, run_options=None, extra: dict | None = None) -> list[torch.Tensor]:
    """Run with IO binding: torch tensors in (on CPU or the session's GPU), torch tensors out, on the
    session's device, without copies through numpy. `extra` binds further inputs given as OrtValues."""
    binding = session.io_binding()
    on_cuda = getattr(session, "provider", session.get_providers()[0]) == CUDA
    device = "cuda" if on_cuda else "cpu"
    keep = []
    for name, value in inputs.items():
        t = value.to(device).contiguous()
        keep.append(t)
        binding.bind_input(name, t.device.type, t.device.index or 0, NUMPY_DTYPES[t.dtype], tuple(t.shape), t.data_ptr())
    for name, value in (extra or {}).items():
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, device)
    session.run_with_iobinding(binding, run_options or ort.RunOptions())
    return [torch.from_dlpack(v._get_c_value()) for v in binding.get_outputs()]


def optimized_model(path, out_path, device: str = "cpu", level: str = "all") -> Path:
    """Save the graph ONNX Runtime really runs, after its own optimizations at `level`
    ("basic", "extended" or "all")."""
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.optimized_model_filepath = str(out_path)
    options.log_severity_level = 3  # the "hardware specific optimizations" notice is expected here
    if os.path.getsize(path) > 1_800_000_000:  # the optimized model must go to external data too
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", Path(out_path).name + ".data")
    ort_session(path, device, options=options)
    return Path(out_path)
