"""The ``gpu`` target: CUDA PyTorch with cuDNN/cuBLASLt epilogues and CUDA graphs."""
