"""One training parameter's value, read and checked against its field's metadata (trainer/params.py `_p`):
`coerce` reads a stored value (the webui writes numbers as strings), `range_problem` says when it lies
outside the field's choices or bounds, `decode_escapes` turns a text box's \\n into a newline."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import DashboardError


def range_problem(f: dataclasses.Field, value: Any) -> str | None:
    """A value outside its field's choices or range, said with the field's label."""
    meta, name = f.metadata, f.metadata["label"]
    if meta.get("choices") and value not in meta["choices"]:
        return f"{name} must be one of {', '.join(meta['choices'])}; got {value!r}."
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} must be a finite number; got {value!r}."
    lo, hi = meta.get("min"), meta.get("max")
    shown = f"{value:g}" if abs(value) < 1e18 else "a huge number"
    if lo is not None and (value < lo or (meta.get("min_open") and value <= lo)):
        return f"{name} must be {'above' if meta.get('min_open') else 'at least'} {lo:g}; got {shown}."
    if hi is not None and value > hi:
        return f"{name} must be at most {hi:g}; got {shown}."
    return None


def decode_escapes(text: str) -> str:
    r"""Turn \n, \t, \r and \\ written in a text box into the characters they name (as the webui does)."""
    out, i = [], 0
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def names_a_file(f: dataclasses.Field) -> bool:
    """Whether the field names a file in datasets/ or formats/ (a picker fed from one of them)."""
    return f.metadata["choices_from"] not in (None, "models")


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """`value` as the field's type, or a DashboardError naming the field's label and what it must be."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off", ""):
                return value.strip().lower() in ("true", "1", "yes", "on")
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            if isinstance(value, str):
                number = float(value.strip())
                if not number.is_integer():
                    raise ValueError
                return int(number)
            if isinstance(value, int):
                return value
            raise ValueError
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
            raise ValueError
        if kind == "str":
            if isinstance(value, (list, dict)):
                raise ValueError
            # The webui writes "None" for a dataset, format or file left unselected.
            if names_a_file(f) and value in ("None", "none"):
                return ""
            return str(value)
    except (ValueError, OverflowError):
        pass
    described = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}[kind]
    shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
    raise DashboardError(f"{f.metadata['label']} must be {described}; got {shown}.", field=f.name)
