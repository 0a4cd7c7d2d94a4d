"""Settings that may take one value per population member, declared by their type alone.

A population's members may differ in every setting that changes no shape (a learning rate, EWC's
``lam``, MC-SGD's ``alpha0``): a constructor parameter annotated ``PerMember[T]`` takes one value of
``T`` for every member or a list with member k's value at position k. The annotation is the whole
declaration: the command line types the option from it (``T | list[T]``), :func:`per_member_settings`
finds the parameter (to give each member's config its own value, to let a sweep pack settings that
differ only there into one population, to flag the column in HParams), :func:`member_list` checks
every value against ``T`` and :func:`member_values` expands it to ``[N]``.

``T`` is a number type that checks a value when called, such as jsonargparse's ``PositiveFloat`` or
a :func:`~jsonargparse.typing.restricted_number_type`; the values must also be finite (the number
types admit ``inf``, with which a run diverges at its first step).
"""

from __future__ import annotations

import inspect
import math
import operator
import types
import typing
from collections.abc import Sequence
from functools import cache
from typing import Any, Union

import torch
from jsonargparse.typing import restricted_number_type
from torch import Tensor

from cl_lightning.errors import ConfigError

__all__ = ["DropoutRate", "FractionOpenBelow", "PerMember", "member_list", "member_values", "per_member_settings"]

#: A dropout probability: 1 would drop everything.
DropoutRate = restricted_number_type("DropoutRate", float, [(">=", 0), ("<", 1)])
#: A weight of the newest information in a running average, in (0, 1].
FractionOpenBelow = restricted_number_type("FractionOpenBelow", float, [(">", 0), ("<=", 1)])

_SYMBOLS = {operator.gt: ">", operator.ge: ">=", operator.lt: "<", operator.le: "<="}


class PerMember:
    """``PerMember[T]`` is ``T | list[T]``: one value for every member, or one per member."""

    def __class_getitem__(cls, kind: type) -> Any:
        return kind | list[kind]


def _element_type(hint: Any) -> type | None:
    """``T`` of a ``PerMember[T]`` annotation (``None`` allowed beside it), else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) not in (Union, types.UnionType) or len(args) != 2:
        return None
    single, listed = args
    return single if typing.get_origin(listed) is list and typing.get_args(listed) == (single,) else None


@cache
def per_member_settings(cls: type) -> dict[str, type]:
    """The per-member settings of ``cls``'s constructor: ``{name: T}`` for each parameter annotated
    ``PerMember[T]`` (or ``PerMember[T] | None``), in signature order."""
    hints = typing.get_type_hints(cls.__init__)
    found = {}
    for name in inspect.signature(cls.__init__).parameters:
        kind = _element_type(hints.get(name))
        if kind is not None:
            found[name] = kind
    return found


def describe(kind: type) -> str:
    """``kind``'s rule in words, e.g. ``> 0 and <= 1`` (its restrictions), or its name."""
    restrictions = getattr(kind, "_restrictions", None)
    if not restrictions:
        return f"a {getattr(kind, '__name__', kind)}"
    return " and ".join(f"{_SYMBOLS.get(op, op)} {ref}" for op, ref in restrictions)


def member_list(values: float | Sequence[float], name: str, kind: type) -> list[float]:
    """The values of a per-member setting (one number, or one per member) as a list of floats,
    refused unless each is a finite value of ``kind``. The number of values is checked against N by
    :func:`member_values` once the population is known."""
    listed = [values] if isinstance(values, (int, float)) else list(values)
    try:
        checked = [float(kind(v)) for v in listed]
    except (TypeError, ValueError):
        checked = []
    if not checked or not all(math.isfinite(v) for v in checked):
        raise ConfigError(f"{name} must be finite and {describe(kind)} for every member, got {values}")
    return checked


def member_values(value: float | Sequence[float], n: int, name: str) -> Tensor:
    """A setting of each of ``n`` members as a float64 ``[n]`` CPU tensor: a single value is every
    member's, a list gives member k's value at position k.

    Raises:
        ConfigError: a list whose length is not ``n`` (``name`` says which setting).
    """
    if isinstance(value, (int, float)):
        return torch.full((n,), float(value), dtype=torch.float64)
    values = [float(v) for v in value]
    if len(values) != n:
        raise ConfigError(f"{name} has {len(values)} values but the population has {n} member(s) (model.seeds / "
                          f"data.seeds): give one value per member, or a single value for all")
    return torch.tensor(values, dtype=torch.float64)
