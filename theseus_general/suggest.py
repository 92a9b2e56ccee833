""""Did you mean ...?" for misspelt names: keyword arguments, adapter options, config fields.

One helper builds every such message so that a typo reads the same wherever it is made
(``Theseus(contianer=...)``, ``Theseus(schedular=...)``, ``adapter="vitt"``, a config field
``batch_sise``): the closest valid names come from `difflib.get_close_matches`.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable, Iterable, List, Sequence

from .errors import UnknownOptionError


def close_matches(name: str, choices: Iterable[str], n: int = 1) -> List[str]:
    """The valid names closest to `name` (at most `n`), best first; [] when none is close."""
    return difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.6)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """"did you mean 'x'?" when a valid name is close to `name`, else ""."""
    match = close_matches(name, choices)
    return f"did you mean {match[0]!r}?" if match else ""


def unknown_names_message(what: str, unknown: Sequence[str], valid: Iterable[str]) -> str:
    """E.g. "unknown keyword argument 'contianer' (did you mean 'container'?)"."""
    valid = list(valid)
    parts = []
    for name in sorted(unknown):
        hint = did_you_mean(name, valid)
        parts.append(f"{name!r} ({hint})" if hint else repr(name))
    plural = "s" if len(unknown) > 1 else ""
    return f"unknown {what}{plural} " + ", ".join(parts)


def check_names(given: Iterable[str], valid: Iterable[str], what: str, accepted_by: str) -> None:
    """Raise UnknownOptionError when a name in `given` is not in `valid`.

    `what` names the kind of name ("keyword argument", "config field"); `accepted_by`
    finishes the message with the valid names, e.g. "Theseus() takes: ..."."""
    valid = list(valid)
    unknown = [name for name in given if name not in valid]
    if unknown:
        raise UnknownOptionError(f"{unknown_names_message(what, unknown, valid)}. {accepted_by}")


def keyword_names(function: Callable, exclude: Iterable[str] = ()) -> List[str]:
    """The named parameters of `function` (no self, no *args/**kwargs), minus `exclude`."""
    skip = set(exclude) | {"self", "cls"}
    return [
        name for name, p in inspect.signature(function).parameters.items()
        if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
