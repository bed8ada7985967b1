"""Dagster Config fields whose defaults are read from the domain, so each knob is defined once.

The domain (a dataclass, a pydantic model, a preset instance or a function's keyword) owns a
default; an asset's `dg.Config` declares the field with `knob(Source, "name")` and turns its
values back into the domain object with `to_domain`. `recsae_pipeline_tests/
test_config_defaults.py` checks every asset Config against its domain sources.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")


def domain_default(source: Any, name: str) -> Any:
    """The default of `name` in `source`: a dataclass (class or instance), a pydantic model
    class, a mapping of presets, or a function's keyword argument."""
    if isinstance(source, type) and issubclass(source, BaseModel):
        if name not in source.model_fields or source.model_fields[name].is_required():
            raise KeyError(f"{source.__name__} has no default for {name!r}")
        return source.model_fields[name].get_default(call_default_factory=True)
    if dataclasses.is_dataclass(source):
        if not isinstance(source, type):
            return getattr(source, name)
        field = {f.name: f for f in dataclasses.fields(source)}.get(name)
        if field is not None and field.default is not dataclasses.MISSING:
            return field.default
        if field is not None and field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        raise KeyError(f"{source.__name__} has no default for {name!r}")
    if isinstance(source, Mapping):
        return source[name]
    if callable(source):
        parameter = inspect.signature(source).parameters.get(name)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            raise KeyError(f"{source.__qualname__} has no default for keyword {name!r}")
        return parameter.default
    raise TypeError(f"cannot read defaults from {source!r}")


def knob(source: Any, name: str, description: str | None = None) -> Any:
    """A pydantic `Field` whose default is `domain_default(source, name)`; the description
    falls back to the domain field's own (pydantic sources)."""
    default = domain_default(source, name)
    if description is None and isinstance(source, type) and issubclass(source, BaseModel):
        description = source.model_fields[name].description
    if isinstance(default, list | dict | set):
        return Field(default_factory=lambda: copy.deepcopy(default), description=description)
    return Field(default=default, description=description)


def to_domain(config: BaseModel, cls: type[T], **values: Any) -> T:
    """`cls` (a dataclass or pydantic model) from the fields of `config` it shares, with
    `values` on top: no field-by-field copying."""
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]
    else:
        names = list(cls.model_fields)  # type: ignore[attr-defined]
    shared = {n: getattr(config, n) for n in names if n in type(config).model_fields}
    return cls(**(shared | values))
