"""Built-in passes, one module per pass family. Find them by name with ``graphopt.get_pass``."""

from graphopt.passes.batchnorm_folding import FoldConvBatchNorm, FoldLinearBatchNorm
from graphopt.passes.cleanup import (
    CommonSubexpressionElimination,
    DeadCodeElimination,
    RemoveDropout,
    RemoveIdentity,
)
from graphopt.passes.constant_folding import ConstantFolding
from graphopt.passes.prune import Prune
from graphopt.passes.quantize import Quantize
from graphopt.passes.split_stages import Partition

__all__ = [
    "CommonSubexpressionElimination",
    "ConstantFolding",
    "DeadCodeElimination",
    "FoldConvBatchNorm",
    "FoldLinearBatchNorm",
    "Partition",
    "Prune",
    "Quantize",
    "RemoveDropout",
    "RemoveIdentity",
]
