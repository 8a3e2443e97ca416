"""The pages' form state that survives a reload, and what the Train form says about its problems.

A browser reload starts a new Streamlit session with empty session state. The values of the Data page's and
the Train form's widgets are therefore also kept in `HOME/.dashboard/form.json` (FORMATS.md): written
atomically whenever a value changes, read when a session starts. Each session writes only the values it
changed, so two tabs do not undo each other's other fields. A value read back is used only where it still
fits its widget (same type, one of the widget's choices); anything else falls back to the default.

The form's tabs: `tab_marks` marks a tab that holds a field with a problem, `fix_sentence` names the fields
and their tabs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from .errors import DashboardError
from .home import home_dir
from .params import FIELDS, GROUPS, label
from .storage import lock_beside, named_lock, read_json, write_json_atomic

FORM_FILE = Path(".dashboard") / "form.json"
GROUP_TITLES = {"basic": "Basic", "data": "Data", "lora": "LoRA", "optimisation": "Optimisation",
                "advanced": "Advanced"}
PROBLEM_MARK = "⚠"


# ---- the state file ----------------------------------------------------------------------------
def form_file() -> Path:
    return home_dir() / FORM_FILE


def read_form() -> dict[str, Any]:
    """The saved widget values (key -> value); empty when there is no readable file."""
    data = read_json(form_file()) or {}
    values = data.get("values")
    return dict(values) if isinstance(values, dict) else {}


def save_form(changes: dict[str, Any]) -> bool:
    """Merge these widget values into the state file (under its lock, written atomically).

    Returns False where the file cannot be written (a read-only home): the form then lasts as long as the
    session, and nothing else is affected."""
    if not changes:
        return True
    path = form_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with named_lock(lock_beside(path)):
            values = {**read_form(), **changes}
            write_json_atomic(path, {"values": dict(sorted(values.items()))})
    except (OSError, TypeError, ValueError):
        return False
    return True


def fits(value: Any, default: Any, choices: Iterable[Any] | None = None) -> bool:
    """Whether a saved value can go into a widget whose first value is `default` (and offers `choices`)."""
    if choices is not None and value not in list(choices):
        return False
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and math.isfinite(value)
    if default is None or isinstance(default, str):
        return value is None or isinstance(value, str)
    return False


def restored(saved: dict[str, Any], key: str, default: Any, choices: Iterable[Any] | None = None) -> Any:
    """The saved value of a widget where it fits, else its default (a float widget gets a float back)."""
    if key not in saved or not fits(saved[key], default, choices):
        return default
    value = saved[key]
    return float(value) if isinstance(default, float) else value


def changed(values: dict[str, Any], known: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The values that differ from what the file is known to hold (a key it lacks holds its baseline)."""
    return {key: value for key, value in values.items() if known.get(key, baseline.get(key)) != value}


# ---- the form's tabs and problems ------------------------------------------------------------------
def problem_counts(problems: list[DashboardError]) -> dict[str, int]:
    """How many problems each group (tab) of the Train form holds; a problem without a field counts nowhere."""
    counts = dict.fromkeys(GROUPS, 0)
    for problem in problems:
        if problem.field in FIELDS:
            counts[FIELDS[problem.field].metadata["group"]] += 1
    return counts


def tab_marks(problems: list[DashboardError]) -> list[str]:
    """What each tab of the form (in form order) is marked with: "⚠ 1" for a tab holding one problem, else ""."""
    counts = problem_counts(problems)
    return [f"{PROBLEM_MARK} {counts[g]}" if counts[g] else "" for g in GROUPS]


def fix_sentence(problems: list[DashboardError]) -> str:
    """ "Fix LoRA name (Basic) and Dataset (Data) to see the plan." for the fields with problems."""
    places = []
    for problem in problems:
        if problem.field in FIELDS:
            place = f"{label(problem.field)} ({GROUP_TITLES[FIELDS[problem.field].metadata['group']]})"
            if place not in places:
                places.append(place)
    if not places:
        return "Fix the problems shown above to see the plan."
    listed = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]
    return f"Fix {listed} to see the plan: each is marked on its tab."
