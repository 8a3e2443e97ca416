"""What a test compares to show that nothing of the user's changed on disk."""

from __future__ import annotations

from pathlib import Path


def _in_sample_cache(path: Path, root: Path) -> bool:
    """Whether `path` is a home folder's cache/ or inside it (a home: a folder that has datasets/)."""
    for folder in (path, *path.parents):
        if folder == root:
            return False
        if folder.name == "cache" and (folder.parent / "datasets").is_dir():
            return True
    return False


def snapshot(root: Path) -> dict:
    """Every file with its size and mtime, and every folder, under `root` (a home, or a folder holding one).

    Left out: the sample cache (cache/), derived data the Data page and the trainer both store the samples of
    a good preview in; the pages' own state (.dashboard/: the form a reload brings back); and the empty
    hidden `.NAME.lock` a GGUF conversion takes in models/ (lock files are never removed: that races)."""
    root = Path(root)
    found = {}
    for path in sorted(root.rglob("*")):
        if _in_sample_cache(path, root) or ".dashboard" in path.relative_to(root).parts:
            continue
        if path.parent.name == "models" and path.name.startswith(".") and path.name.endswith(".lock"):
            continue
        found[str(path.relative_to(root))] = (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() \
            else "dir"
    return found
