"""graphopt: a compiler-style graph optimizer for PyTorch models, with proof of equivalence.

```python
fast = graphopt.optimize(model, example_inputs, target="cpu")   # or "gpu", "onnx"
fast(*example_inputs)
print(fast.report)
fast.export_onnx("model.onnx")
fast = graphopt.optimize(model, example_inputs, compress=[graphopt.Prune(0.5), graphopt.Int8Dynamic()])
```
"""


from graphopt.analysis import NodeCost
from graphopt.analysis.balanced_split import PartitionError
from graphopt.errors import (
    CaptureError,
    DeviceUnavailableError,
    FidelityError,
    GraphoptError,
    InputError,
    LoweringError,
    PassError,
    RollbackWarning,
    SaveFileError,
    StateError,
    UnknownPassError,
    UnknownTargetError,
    UnsupportedOpError,
    VerificationError,
)
from graphopt.ir.capture import CapturedModel, capture
from graphopt.ir.shapes import DynamicDims
from graphopt.passes.base import Pass, PassResult, available_passes, get_pass, register_pass
from graphopt.passes.compress import Compression, Int8Dynamic, Int8Static, KMeans, WeightOnly
from graphopt.passes.instruments import Instrument, IRDumpInstrument, TimingInstrument
from graphopt.passes.lossy.base import CalibrationData, Fidelity, LossyPass, LossyPlan, LossyUnit
from graphopt.passes.manager import PassManager
from graphopt.passes.precision import ReducedPrecision
from graphopt.passes.prune import Prune
from graphopt.passes.rules import Match, Refusal, RewriteRules, Rule
from graphopt.report import PassRecord, PlotSpec, Report, ReportSection
from graphopt.targets.base import DEFAULT_PIPELINE, Target, available_targets, get_target
from graphopt.targets.cpu.lowering import CpuLowering
from graphopt.targets.gpu.lowering import GpuLowering
from graphopt.targets.onnx.options import OnnxLowering
from graphopt.version import __version__
from graphopt.workflows.analyze import ModelAnalysis, analyze
from graphopt.workflows.distill import distill
from graphopt.workflows.generation import GenerativeModel
from graphopt.workflows.optimize import optimize
from graphopt.workflows.optimized_model import OptimizedModel, load
from graphopt.workflows.options import Dynamic, PassPipeline, Verify
from graphopt.workflows.partition import PartitionedModel, PartitionReport, partition
from graphopt.workflows.recipe import recipe

__all__ = [
    "DEFAULT_PIPELINE",
    "CaptureError",
    "CapturedModel",
    "DeviceUnavailableError",
    "CalibrationData",
    "Compression",
    "CpuLowering",
    "Dynamic",
    "DynamicDims",
    "Fidelity",
    "FidelityError",
    "GraphoptError",
    "GpuLowering",
    "IRDumpInstrument",
    "InputError",
    "Instrument",
    "Int8Dynamic",
    "Int8Static",
    "KMeans",
    "LossyPass",
    "LossyPlan",
    "LossyUnit",
    "LoweringError",
    "Match",
    "ModelAnalysis",
    "NodeCost",
    "OnnxLowering",
    "GenerativeModel",
    "OptimizedModel",
    "Pass",
    "PassError",
    "PassManager",
    "PassPipeline",
    "PartitionError",
    "PartitionReport",
    "PartitionedModel",
    "PassRecord",
    "PassResult",
    "Prune",
    "PlotSpec",
    "ReducedPrecision",
    "Refusal",
    "Report",
    "ReportSection",
    "RewriteRules",
    "RollbackWarning",
    "Rule",
    "SaveFileError",
    "StateError",
    "Target",
    "TimingInstrument",
    "UnknownPassError",
    "UnknownTargetError",
    "UnsupportedOpError",
    "VerificationError",
    "Verify",
    "WeightOnly",
    "__version__",
    "analyze",
    "available_passes",
    "available_targets",
    "capture",
    "distill",
    "get_pass",
    "get_target",
    "load",
    "optimize",
    "partition",
    "recipe",
    "register_pass",
]
