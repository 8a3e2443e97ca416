"""The shape of the code base: each concern in a module of readable size, page scripts without logic.

Limits from issue 10: no module of trainer/ over about 450 lines, no function over about 80 (the training
loop is the one exception, as in nanoGPT, and it shows only the loop)."""

from __future__ import annotations

import ast
from pathlib import Path

from trainer.home import CODE_ROOT

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
# The one function allowed to be longer: the training loop itself (it holds only the loop).
LONG_FUNCTIONS = {("trainer/train.py", "train_run"): 160}


def python_files(folder: str) -> list[Path]:
    return sorted((CODE_ROOT / folder).glob("*.py"))


def _relative(path: Path) -> str:
    return str(path.relative_to(CODE_ROOT)) if path.is_relative_to(CODE_ROOT) else str(path)


def long_functions(path: Path, limit: int) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            allowed = LONG_FUNCTIONS.get((_relative(path), node.name), limit)
            if length > allowed:
                found.append((node.name, length))
    return found


def test_no_trainer_module_is_too_long():
    too_long = {str(p.relative_to(CODE_ROOT)): n for p in python_files("trainer")
                if (n := p.read_text(encoding="utf-8").count("\n")) > MAX_MODULE_LINES}
    assert too_long == {}


def test_no_function_is_too_long():
    found = {str(p.relative_to(CODE_ROOT)): long for folder in ("trainer", "views")
             for p in python_files(folder) if (long := long_functions(p, MAX_FUNCTION_LINES))}
    assert found == {}


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 5))
    sample = tmp_path / "sample.py"
    sample.write_text(f"def long_one():\n{body}\n\ndef short_one():\n    return 1\n")
    assert long_functions(sample, MAX_FUNCTION_LINES) == [("long_one", MAX_FUNCTION_LINES + 6)]


def test_code_does_not_cite_a_document_outside_the_repository():
    citing = [str(p.relative_to(CODE_ROOT)) for folder in ("trainer", "views") for p in python_files(folder)
              if "DESIGN.md" in p.read_text(encoding="utf-8")]
    assert citing == []
