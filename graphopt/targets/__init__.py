"""Backends that lower an optimized graph: ``cpu`` and ``gpu`` (PyTorch), ``onnx`` (onnxruntime)."""
