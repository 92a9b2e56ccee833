"""Adapter registry: `@register_adapter(name)`, lookup by name, auto-detection.

Built-in adapters live in ``theseus_general.adapters`` and register themselves on
import. Third parties register theirs the same way; a registered adapter gets the
whole conformance test suite.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Type

from torch import nn

from .adapter import Adapter
from .errors import AdapterError
from .suggest import check_names, did_you_mean

_REGISTRY: Dict[str, Type[Adapter]] = {}


def register_adapter(name: str, *, replace: bool = False) -> Callable[[Type[Adapter]], Type[Adapter]]:
    """Class decorator that registers an `Adapter` subclass under `name`."""
    if not isinstance(name, str) or not name:
        raise AdapterError(f"An adapter name must be a non-empty string, got {name!r}.")

    def decorate(cls: Type[Adapter]) -> Type[Adapter]:
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise AdapterError(f"@register_adapter({name!r}) needs a subclass of theseus_general.Adapter, got {cls!r}.")
        if name in _REGISTRY and _REGISTRY[name] is not cls and not replace:
            raise AdapterError(
                f"An adapter named {name!r} is already registered ({_REGISTRY[name].__qualname__}); "
                "pick another name or pass replace=True."
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_adapters() -> List[str]:
    """Names of all registered adapters, in registration order."""
    return list(_REGISTRY)


def adapter_class(name: str) -> Type[Adapter]:
    if name not in _REGISTRY:
        hint = did_you_mean(name, _REGISTRY) if isinstance(name, str) else ""
        raise AdapterError(
            f"No adapter named {name!r}{f' ({hint})' if hint else ''}. Registered adapters: {', '.join(_REGISTRY) or 'none'}."
        )
    return _REGISTRY[name]


def get_adapter(name: str, **options) -> Adapter:
    """An instance of the adapter registered as `name`, with its options. An option the
    adapter does not take raises UnknownOptionError with the closest valid name."""
    cls = adapter_class(name)
    valid = cls.option_names()
    takes = f"takes: {', '.join(valid)}" if valid else "takes no options"
    check_names(options, valid, "adapter option", f"The {name} adapter {takes}.")
    return cls(**options)


def detect_adapter(model: nn.Module) -> Adapter:
    """The first registered adapter whose `matches(model)` is true (adapters with
    `auto_detect = False`, such as the generic one, are only used by name)."""
    for cls in _REGISTRY.values():
        if cls.auto_detect and cls.matches(model):
            return cls()
    raise AdapterError(
        f"No registered adapter recognises a {type(model).__qualname__}. "
        f"Registered adapters: {', '.join(_REGISTRY) or 'none'}. "
        "Either name the blocks to compress with the generic route, e.g. "
        "Theseus(model, adapter='generic', container='encoder.blocks', successor_depth=3), "
        "or write an Adapter subclass and register it with @register_adapter('name')."
    )
