"""A full disk during a checkpoint save: the run ends failed with a sentence (where, how much the checkpoint
needed, which complete checkpoint a resume will use), no half-written folder is left, and once space is freed
a resume from the named checkpoint completes.

The run folder is a small tmpfs mounted for the test (the tests run as root, here and in CI); a filler file
leaves room for one checkpoint and part of the next."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from trainer.checkpoints import disk_full_sentence, is_disk_full, list_checkpoints

from .trainhelpers import TINY_PARAMS, metrics_of, run_trainer, status_of, write_run

PAGE = 4096  # tmpfs counts whole pages
# A rank large enough that a checkpoint (the adapter, twice its size of AdamW state) dwarfs status.json and
# metrics.jsonl, so that the room left decides which save fails.
BIG_ADAPTER = {"lora_rank": 64, "lora_alpha": 128, "target_modules": "all-linear"}


@contextmanager
def small_filesystem(folder: Path, size_kb: int):
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"This test mounts a small tmpfs and needs root (or CAP_SYS_ADMIN): `mount -t tmpfs` failed: "
                    f"{mounted.stderr.strip() or mounted.stdout.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def pages(folder: Path) -> int:
    """The bytes `folder`'s files take on a tmpfs."""
    return sum(math.ceil(p.stat().st_size / PAGE) * PAGE for p in folder.rglob("*") if p.is_file())


def checkpoint_bytes(home: Path) -> int:
    """The size of one checkpoint of the test's run, measured by a run on the ordinary disk."""
    run_dir = write_run(home, "measure", max_steps=3, save_steps=1, **BIG_ADAPTER)
    assert run_trainer(run_dir).returncode == 0
    return pages(run_dir / "checkpoint-1")


def bytes_in(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+) (bytes|kB|MB|GB)", text).groups()
    return float(number) * {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


@pytest.mark.parametrize("share", [0.15, 0.8], ids=["the adapter file does not fit", "the optimiser file does not fit"])
def test_a_full_disk_during_a_checkpoint_fails_cleanly_and_resumes(home, share):
    """share: the part of a checkpoint left free once checkpoint-2 is written. With 0.15 the adapter itself
    cannot be written (the issue's SafetensorError), with 0.8 the optimiser state cannot (an OSError ENOSPC)."""
    checkpoint = checkpoint_bytes(home)
    assert checkpoint > 512 * 1024, "the checkpoint must dwarf the run's small files"
    run_dir = home / "loras" / "full"
    with small_filesystem(run_dir, 8 * 1024):
        params = {**TINY_PARAMS, "lora_name": "full", "max_steps": 6, "save_steps": 2, "save_total_limit": 1,
                  **BIG_ADAPTER}
        (run_dir / "training_parameters.json").write_text(json.dumps(params))
        # Room for checkpoint-2, the run's small files (status, metrics: 32 kB) and `share` of checkpoint-4.
        filler = run_dir / "filler.bin"
        filler.write_bytes(b"\0" * (shutil.disk_usage(run_dir).free - checkpoint - 32 * 1024 - int(share * checkpoint)))

        result = run_trainer(run_dir)
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
        cause = "SafetensorError: Error while serializing" if share < 0.5 else "OSError: [Errno 28] No space left"
        assert cause in result.stderr, result.stderr[-3000:]  # the traceback in the log names what failed
        status = status_of(run_dir)
        error = status["error"]
        assert status["state"] == "failed" and status["step"] == 4, error
        assert error.startswith(f"Saving checkpoint-4 failed: the disk holding {run_dir} is full ("), error
        needed = re.search(r"It needed about ([\d.]+ \w+)\.", error)
        assert needed and 0.9 * checkpoint <= bytes_in(needed.group(1)) <= 1.5 * checkpoint, error
        assert "A resume will use checkpoint-2, the newest complete checkpoint" in error, error
        assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".checkpoint")], \
            "no half-written checkpoint folder is left"
        assert [c.name for c in list_checkpoints(run_dir)] == ["checkpoint-2"], "the complete checkpoint survives"
        assert not (run_dir / "adapter_model.safetensors").exists()

        filler.unlink()  # free space, then resume from the checkpoint the sentence named
        named = re.search(r"A resume will use (checkpoint-\d+)", error).group(1)
        resumed = run_trainer(run_dir, "--resume", named)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        status = status_of(run_dir)
        assert status["state"] == "completed" and status["step"] == 6 and status["resumed_from"] == "checkpoint-2"
        assert [r["step"] for r in metrics_of(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
        assert [c.name for c in list_checkpoints(run_dir)] == ["checkpoint-4"], "keep the last 1"
        assert (run_dir / "adapter_model.safetensors").is_file()


def test_what_counts_as_a_full_disk(tmp_path):
    import errno

    import torch
    from safetensors.torch import save_file

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("something else"))
    try:
        raise RuntimeError("while saving") from OSError(errno.ENOSPC, "No space left on device")
    except RuntimeError as chained:
        assert is_disk_full(chained)
    with small_filesystem(tmp_path / "tiny", 16):
        with pytest.raises(Exception) as raised:  # the error, from safetensors itself
            save_file({"a": torch.zeros(100_000)}, tmp_path / "tiny" / "a.safetensors")
        assert type(raised.value).__name__ == "SafetensorError" and is_disk_full(raised.value)
        sentence = disk_full_sentence(tmp_path / "tiny", "Saving checkpoint-9", 61_200)
        assert sentence.startswith(f"Saving checkpoint-9 failed: the disk holding {tmp_path / 'tiny'} is full (")
        assert "It needed about 61.2 kB." in sentence and "cannot be resumed" in sentence
