"""The composer room: pure tensor math on LoRA factors. No Redis, no HTTP."""

from composer import methods as _methods  # noqa: F401  (registers the built-in methods)
from composer.compose import ComposeReport, CompositionCancelled, compose
from composer.cost import Cost, compose_cost
from composer.fusion import FusionWeights, fuse
from composer.registry import METHODS, MergeMethod, get_method, merge_method
from composer.spec import Composition

__all__ = ["METHODS", "ComposeReport", "CompositionCancelled", "Composition", "Cost", "compose_cost", "FusionWeights", "fuse", "MergeMethod", "compose", "get_method", "merge_method"]
