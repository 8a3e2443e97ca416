"""The home folder (models/, datasets/, loras/, formats/) and safe resolution of user-given names in it.

The home defaults to the checkout; `LORA_DASHBOARD_HOME` points it elsewhere, for example at a
text-generation-webui `user_data` folder, whose datasets and format files live in `training/datasets/` and
`training/formats/` and its chat templates in `instruction-templates/`: those are read alongside the home's
own `datasets/` and `formats/`. Formats and instruction templates fall back to the ones shipped in the
checkout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import DashboardError

HOME_ENV = "LORA_DASHBOARD_HOME"
# Which files are datasets, by ending (datafiles.py holds the rest of that rule).
RAW_TEXT_ENDINGS = (".txt", ".md")
TABLE_ENDINGS = (".csv", ".tsv", ".parquet")
ROWS_ENDINGS = (".json", ".jsonl") + TABLE_ENDINGS
DATASET_ENDINGS = RAW_TEXT_ENDINGS + ROWS_ENDINGS
TEMPLATE_ENDINGS = (".yaml", ".yml")  # instruction templates (text-generation-webui's)
CODE_ROOT = Path(__file__).resolve().parent.parent

# Names Windows reserves: refused everywhere so a folder copied between systems keeps working.
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,99}$")


def home_dir() -> Path:
    return Path(os.environ.get(HOME_ENV) or CODE_ROOT).expanduser().resolve()


def models_dir() -> Path:
    return home_dir() / "models"


def datasets_dir() -> Path:
    """The home's own datasets/: where uploads are written."""
    return home_dir() / "datasets"


def datasets_dirs() -> list[Path]:
    """Where datasets are found: the home's datasets/, then a webui's training/datasets/."""
    return [datasets_dir(), home_dir() / "training" / "datasets"]


def loras_dir() -> Path:
    return home_dir() / "loras"


def formats_dirs() -> list[Path]:
    """Where format files are looked up: the home's formats/, a webui's training/formats/, then the shipped ones."""
    dirs = [home_dir() / "formats", home_dir() / "training" / "formats", CODE_ROOT / "formats"]
    return list(dict.fromkeys(dirs))


def instruction_templates_dirs() -> list[Path]:
    """Where instruction templates (chat templates in webui YAML files) are looked up: the home's
    instruction-templates/ (a webui's own), then the shipped ones."""
    return list(dict.fromkeys([home_dir() / "instruction-templates", CODE_ROOT / "instruction-templates"]))


def check_name(name: str, what: str = "name") -> str:
    """A single safe file or folder name: no separators, no `..`, not hidden, not reserved."""
    if not isinstance(name, str) or not name.strip():
        raise DashboardError(f"The {what} is empty.")
    name = name.strip()
    if "\x00" in name:
        raise DashboardError(f"The {what} contains a NUL byte.")
    if "/" in name or "\\" in name:
        raise DashboardError(f"The {what} {name!r} contains a path separator; use a plain name.")
    if name in (".", "..") or name.startswith("."):
        raise DashboardError(f"The {what} {name!r} starts with a dot; hidden names are not allowed.")
    if name.split(".")[0].upper() in _RESERVED:
        raise DashboardError(f"The {what} {name!r} is a reserved device name; choose another.")
    if not _NAME_RE.match(name):
        raise DashboardError(
            f"The {what} {name!r} may only use letters, digits, spaces, '.', '_' and '-' (at most 100)."
        )
    return name


def resolve_inside(base: Path, relative: str, what: str = "path") -> Path:
    """Resolve a browser-given relative path inside `base`, refusing anything that leaves it.

    Symbolic links are followed before the check, so a link pointing out of the folder is refused.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise DashboardError(f"The {what} is empty.")
    if "\x00" in relative:
        raise DashboardError(f"The {what} contains a NUL byte.")
    rel = Path(relative)
    if rel.is_absolute():
        raise DashboardError(f"The {what} {relative!r} is absolute; give a path inside {base}.")
    # The checked parts are used, not the raw string: check_name strips surrounding whitespace, so a name
    # such as "notes.txt\n" names the file it was checked as.
    rel = Path(*(check_name(part, what) for part in rel.parts))
    base = base.resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise DashboardError(f"The {what} {relative!r} points outside {base}.")
    return target


def resolve_user_path(value: str, kind: str) -> Path:
    """Resolve a path from the command line or training_parameters.json (trusted caller).

    Absolute paths are taken as they are; relative ones are relative to the home folder; a bare
    webui-style name (`alpaca-data`) is looked up in the kind's folders (datasets/ and training/datasets/,
    the format or instruction-template folders) with its ending.
    `kind` is "dataset", "format", "instruction template", "lora" or "model".
    """
    if "\x00" in value:
        raise DashboardError(f"The {kind} path contains a NUL byte.")
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    if kind == "dataset":
        folders, endings = datasets_dirs(), ("", *ROWS_ENDINGS, *RAW_TEXT_ENDINGS)
    elif kind == "format":
        folders, endings = formats_dirs(), ("", ".json")
    elif kind == "instruction template":
        folders, endings = instruction_templates_dirs(), ("", *TEMPLATE_ENDINGS)
    elif kind == "lora":
        folders, endings = [loras_dir()], ("",)
    else:
        folders, endings = [models_dir()], ("", ".gguf")
    # A bare name means the kind's own folder first (so `requirements.txt` as a dataset is never the
    # checkout's file); a path with folders is relative to the home.
    if len(path.parts) == 1:
        for folder in folders:
            for ending in endings:
                found = folder / (value + ending)
                if found.exists():
                    return found
    return home_dir() / path
