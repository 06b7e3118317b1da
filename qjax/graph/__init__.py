"""Reading a function as a jaxpr: which params leaf feeds which matmul/conv operand, and
re-evaluating it with those ops replaced."""

from qjax.graph.batchnorm import BatchNormSite, batchnorm_sites
from qjax.graph.coupling import ChannelGroup, Member, channel_groups, format_groups
from qjax.graph.fold import FoldGroup, fold_groups
from qjax.graph.interpret import (
    Handler,
    LayoutOp,
    WeightRef,
    bind_eqn,
    evaluate,
    materialize,
    run,
    weight_operand,
)
from qjax.graph.layout import apply_layout, unpacked
from qjax.graph.ops import OpInfo, find_ops, operand_channel_axes
from qjax.graph.statistics import InputStatistic, gram, input_statistics
from qjax.graph.trace import Traced, abstract_params, nnx_apply, trace

__all__ = [
    "BatchNormSite",
    "batchnorm_sites",
    "ChannelGroup",
    "Member",
    "channel_groups",
    "format_groups",
    "FoldGroup",
    "InputStatistic",
    "fold_groups",
    "gram",
    "input_statistics",
    "Handler",
    "LayoutOp",
    "OpInfo",
    "Traced",
    "WeightRef",
    "abstract_params",
    "apply_layout",
    "bind_eqn",
    "evaluate",
    "find_ops",
    "materialize",
    "nnx_apply",
    "operand_channel_axes",
    "run",
    "trace",
    "unpacked",
    "weight_operand",
]
