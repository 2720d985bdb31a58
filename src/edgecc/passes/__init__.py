"""Passes: the base vocabulary, the manager, textual pipelines, and every built-in pass.

Write your own with `@register_pass` on a frozen dataclass subclass of `Pass` (see docs/writing-a-pass.md).
"""

from edgecc.passes import (canonicalize, convert_fp16, cse, dce, fold_batchnorm, fold_constants,  # noqa: F401
                           fuse_epilogues, infer_shapes, lower_qdq, plan_memory, quantize_int8)  # noqa: F401
from edgecc.passes import prune  # noqa: F401  (compression, opt-in)
from edgecc.passes import prune_channels  # noqa: F401  (compression, opt-in)
from edgecc.passes import low_rank  # noqa: F401  (compression, opt-in)
from edgecc.passes import encode_sparsity  # noqa: F401  (end of -O2/-O3)
from edgecc.passes import cluster_weights  # noqa: F401  (compression, opt-in)
from edgecc.passes import patch_execution  # noqa: F401  (RAM, opt-in)
from edgecc.passes.base import CANONICAL, SHAPES_INFERRED, TOPO_SORTED, Pass, PassContext, PassResult
from edgecc.passes.manager import PassManager
from edgecc.passes.pipeline import OPT_PIPELINES, parse_pipeline, pipeline_for_level
from edgecc.passes.registry import all_passes, get_pass_class, load_pass_plugin, register_pass
from edgecc.passes.rewrite import RewriteRule, apply_rules

__all__ = [
    "CANONICAL", "OPT_PIPELINES", "SHAPES_INFERRED", "TOPO_SORTED", "Pass", "PassContext", "PassManager",
    "PassResult", "RewriteRule", "all_passes", "apply_rules", "get_pass_class", "load_pass_plugin",
    "parse_pipeline", "pipeline_for_level", "register_pass",
]
