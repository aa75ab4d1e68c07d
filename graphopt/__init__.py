"""graphopt: a compiler-style graph optimizer for PyTorch models, with proof of equivalence.

```python
fast = graphopt.optimize(model, example_inputs, target="cpu")   # or "gpu", "onnx"
fast(*example_inputs)
print(fast.report)
fast.export_onnx("model.onnx")
```
"""

from graphopt.analysis import ModelAnalysis, NodeCost, analyze
from graphopt.analysis.partitioning import PartitionError
from graphopt.api import OptimizedModel, optimize
from graphopt.capture import CapturedModel, capture
from graphopt.distill import distill
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
from graphopt.instruments import Instrument, IRDumpInstrument, TimingInstrument
from graphopt.lossy import CalibrationData, Fidelity, LossyPass, LossyPlan, LossyUnit
from graphopt.partition import PartitionedModel, PartitionReport, partition
from graphopt.pass_infra import Pass, PassResult, available_passes, get_pass, register_pass
from graphopt.pass_manager import PassManager
from graphopt.passes.prune import Prune
from graphopt.report import PassRecord, PlotSpec, Report, ReportSection
from graphopt.rules import Match, Refusal, RewriteRules, Rule
from graphopt.serialize import load
from graphopt.shapes import DynamicDims
from graphopt.target import DEFAULT_PIPELINE, Target, available_targets, get_target

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PIPELINE",
    "CaptureError",
    "CapturedModel",
    "DeviceUnavailableError",
    "CalibrationData",
    "DynamicDims",
    "Fidelity",
    "FidelityError",
    "GraphoptError",
    "IRDumpInstrument",
    "InputError",
    "Instrument",
    "LossyPass",
    "LossyPlan",
    "LossyUnit",
    "LoweringError",
    "Match",
    "ModelAnalysis",
    "NodeCost",
    "OptimizedModel",
    "Pass",
    "PassError",
    "PassManager",
    "PartitionError",
    "PartitionReport",
    "PartitionedModel",
    "PassRecord",
    "PassResult",
    "Prune",
    "PlotSpec",
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
    "register_pass",
]
