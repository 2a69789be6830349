"""The op-rule table: how each ONNX op relates the axes of its inputs and outputs.

One entry per op family, grouped by module. A rule ties axes that index the same space (``g.tie``),
blocks axes it reduces or mixes (``g.block``), and registers a rewrite hook when attributes or shape
constants depend on axis extents. An op with no entry is declined: its axes are blocked with the reason.
To support a new op, add a function with ``@rule("OpType")`` (``domain=`` for contrib ops) in the fitting module and a test in
tests/test_rules.py.
"""

from graphprune.analysis.rules import (  # noqa: F401
    attention,
    elementwise,
    layout,
    linear,
    normalization,
    reductions,
    spatial,
)
from graphprune.analysis.rules.base import RULES, rule, rule_for

__all__ = ["RULES", "rule", "rule_for"]
