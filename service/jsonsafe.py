"""What JSON can carry, and what a database can store: checked at the door, scrubbed
from upstream. Pure; imports nothing of ours.

Python's ``json`` reads more than JSON: a lone surrogate escape (``"\\ud800"``) becomes
a ``str`` that cannot be encoded as UTF-8, and ``NaN``, ``Infinity`` or ``1e400``
become floats that JSON cannot write back. Stored, either one breaks every later read
of the job (its view cannot be encoded: a 500, from every process, for good). So:

- a caller's request is refused (422) when any of its strings or numbers is such a
  value, naming each place (:func:`problems`);
- what a provider or an http task sends back is stored scrubbed (:func:`scrub`): a
  lone surrogate becomes U+FFFD, a number JSON cannot carry becomes ``null``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

Loc = tuple[str | int, ...]
# Any surrogate code point left in a ``str`` is a lone one: ``json`` joins valid pairs.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _replaced(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


def _clean(value: Any) -> bool:
    """Whether ``value`` surely holds nothing :func:`problems` would name: JSON writes it
    (no number it cannot represent) and that text encodes as UTF-8 (no lone surrogate).
    One pass in C, where :func:`problems` walks it in Python; False (walk it) when
    ``json`` cannot write it at all."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return False
    return True


def problems(value: Any) -> Iterator[tuple[Loc, str]]:
    """``(path, why)`` for every string (keys included) that is not valid Unicode and
    every number JSON cannot represent, in document order."""
    if isinstance(value, dict | list) and _clean(value):
        return iter(())
    return _walk(value, ())


def _walk(value: Any, loc: Loc) -> Iterator[tuple[Loc, str]]:
    if isinstance(value, str):
        if _bad_text(value):
            yield loc, "text that is not valid Unicode (a lone surrogate)"
    elif isinstance(value, float):
        if not math.isfinite(value):
            yield loc, f"{value} is a number JSON cannot represent"
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _bad_text(key):
                yield (*loc, _replaced(key)), ("a key that is not valid Unicode (a lone surrogate)")
            yield from _walk(item, (*loc, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, (*loc, i))


def scrub(value: Any) -> Any:
    """``value`` with every lone surrogate replaced by U+FFFD and every non-finite number
    by None. Returns ``value`` itself (no copy) when there is nothing to replace."""
    if isinstance(value, str):
        return _replaced(value) if _bad_text(value) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        if next(problems(value), None) is None:
            return value
        return {scrub(k) if isinstance(k, str) else k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        if next(problems(value), None) is None:
            return value
        return [scrub(item) for item in value]
    return value
