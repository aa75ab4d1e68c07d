"""The ``cpu`` target: oneDNN-fused PyTorch on the CPU, int8 via oneDNN kernels."""
