"""The ``onnx`` target: export to ONNX and run in onnxruntime."""
