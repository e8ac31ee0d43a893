"""The ``when:`` expressions of search-space parameters: a small, safe condition language.

A parameter may be searched only under a condition on earlier parameters or
recipe fields, ``when: model.vd.size > 0``. The condition is Python
expression syntax, parsed with :mod:`ast` and checked node by node
(:func:`parse_when`): only comparisons (``== != < <= > >= in``, ``not in``),
``and``/``or``/``not``, dotted names, constants (numbers, strings, booleans,
``true``/``false``/``null``) and tuples/lists of them are accepted. Nothing is
ever passed to ``eval``: :func:`eval_when` walks the checked tree, asking a
lookup function for the value of each dotted name.
"""

from __future__ import annotations

import ast
import typing
from typing import Any

_CMP = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_CONST_NAMES = {"true": True, "True": True, "false": False, "False": False, "null": None, "None": None}


class WhenError(ValueError):
    """A ``when:`` expression that is not allowed, or that cannot be evaluated."""


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` (Name/Attribute chain) -> "a.b.c"; anything else -> None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _check_when_node(node: ast.AST, names: list[str]) -> None:
    """Allow only comparisons, boolean operators, dotted names and constants."""
    if isinstance(node, ast.Expression):
        _check_when_node(node.body, names)
    elif isinstance(node, ast.BoolOp):
        for value in node.values:
            _check_when_node(value, names)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _check_when_node(node.operand, names)
    elif (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, (ast.USub, ast.UAdd))
        and isinstance(node.operand, ast.Constant)
        and isinstance(node.operand.value, (int, float))
    ):
        pass
    elif isinstance(node, ast.Compare):
        if not all(type(op) in _CMP for op in node.ops):
            raise WhenError("only ==, !=, <, <=, >, >=, in and not in compare values")
        _check_when_node(node.left, names)
        for comp in node.comparators:
            _check_when_node(comp, names)
    elif isinstance(node, (ast.Name, ast.Attribute)):
        dotted = _dotted(node)
        if dotted is None:
            raise WhenError(f"{ast.unparse(node)!r} is not a dotted parameter path")
        if dotted not in _CONST_NAMES:
            names.append(dotted)
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, (int, float, str, bool, type(None))):
            raise WhenError(f"constant {node.value!r} is not a number, string, boolean or null")
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        for elt in node.elts:
            _check_when_node(elt, names)
    else:
        raise WhenError(
            f"{type(node).__name__} ({ast.unparse(node)!r}) is not allowed; use comparisons (== != < <= > >= in), and/or/not, parameter paths and constants"
        )


def parse_when(text: str) -> tuple[ast.Expression, list[str]]:
    """Parse a ``when:`` expression; returns the tree and the dotted names it reads.

    Only comparisons, ``and``/``or``/``not``, dotted names, constants and
    tuples/lists of constants are accepted; nothing is ever passed to eval.
    """
    if not isinstance(text, str) or not text.strip():
        raise WhenError("expected a non-empty expression string, e.g. 'model.vd.size > 0'")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise WhenError(f"not a valid expression: {exc.msg}") from exc
    names: list[str] = []
    _check_when_node(tree, names)
    return tree, list(dict.fromkeys(names))


def eval_when(tree: ast.AST, lookup: typing.Callable[[str], Any]) -> Any:
    """Evaluate a tree accepted by :func:`parse_when`; ``lookup(path)`` gives a name's value."""
    if isinstance(tree, ast.Expression):
        return eval_when(tree.body, lookup)
    if isinstance(tree, ast.BoolOp):
        if isinstance(tree.op, ast.And):
            result: Any = True
            for value in tree.values:
                result = eval_when(value, lookup)
                if not result:
                    return result
            return result
        result = False
        for value in tree.values:
            result = eval_when(value, lookup)
            if result:
                return result
        return result
    if isinstance(tree, ast.UnaryOp):
        operand = eval_when(tree.operand, lookup)
        if isinstance(tree.op, ast.Not):
            return not operand
        return -operand if isinstance(tree.op, ast.USub) else +operand
    if isinstance(tree, ast.Compare):
        left = eval_when(tree.left, lookup)
        for op, comp in zip(tree.ops, tree.comparators):
            right = eval_when(comp, lookup)
            try:
                ok = _CMP[type(op)](left, right)
            except TypeError as exc:
                raise WhenError(f"cannot compare {left!r} with {right!r}: {exc}") from exc
            if not ok:
                return False
            left = right
        return True
    if isinstance(tree, (ast.Name, ast.Attribute)):
        dotted = _dotted(tree)
        if dotted is None:  # an attribute of something other than a name: not a path
            raise WhenError(f"{ast.unparse(tree)!r} is not a dotted path")
        if dotted in _CONST_NAMES:
            return _CONST_NAMES[dotted]
        return lookup(dotted)
    if isinstance(tree, ast.Constant):
        return tree.value
    if isinstance(tree, (ast.Tuple, ast.List, ast.Set)):
        return tuple(eval_when(elt, lookup) for elt in tree.elts)
    raise WhenError(f"unsupported expression {ast.unparse(tree)!r}")
