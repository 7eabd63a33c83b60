"""Deployment: ONNX export of folded graphs, ONNX Runtime sessions, and ONNX graph diffs."""
