"""A sweep from the command line (issue 13): a 2 x 2 grid of the tiny model (learning rate x rank) is recorded
as one experiment, queued and run to the end; `rank --evaluate` then lists its four adapters with held-out
perplexity and forgetting ratio, best first."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from trainer import runqueue, sweeps
from trainer.home import CODE_ROOT
from trainer.params import TrainingParameters
from trainer.runfiles import read_status

from .test_queue_runs import kill_all
from .trainhelpers import TINY_PARAMS, wait_for

HELD_OUT = ("The queue starts the next run when one ends. A sweep tries every combination of the values it "
            "is given, and the ranking names the adapter with the lowest held-out perplexity.\n") * 6
NAMES = ["grid-lr1e-3-r4", "grid-lr1e-3-r8", "grid-lr3e-3-r4", "grid-lr3e-3-r8"]


def trainer_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=CODE_ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def sweep_home(home):
    (home / "datasets" / "held-out.txt").write_text(HELD_OUT)
    base = {**TINY_PARAMS, "lora_name": "grid", "max_steps": 2, "eval_dataset": "held-out.txt", "eval_steps": 2}
    (home / "sweep.json").write_text(json.dumps({"base": base, "sweep": {"learning_rate": [1e-3, 3e-3],
                                                                         "lora_rank": "4, 8"}}))
    yield home
    runqueue.queue_path().unlink(missing_ok=True)
    kill_all(home)


def test_a_2x2_sweep_from_the_command_line_runs_to_the_end_and_ranks_four_adapters(sweep_home):
    home = sweep_home
    done = trainer_cli("sweep", "--sweep-file", "sweep.json")  # relative to the home folder
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == NAMES
    experiment = sweeps.read_experiment("grid")
    assert experiment["runs"] == NAMES and experiment["swept"] == {"learning_rate": [1e-3, 3e-3], "lora_rank": [4, 8]}
    assert TrainingParameters.from_file(home / "loras" / NAMES[3] / "training_parameters.json").lora_rank == 8

    ends = [wait_for(lambda d=home / "loras" / n: (s := read_status(d) or {}).get("state") in
                     ("completed", "stopped", "failed") and s, timeout=120, what=f"{n} to end") for n in NAMES]
    assert [s["state"] for s in ends] == ["completed"] * 4, ends
    for before, after in zip(ends, ends[1:]):  # one after another on the one CPU
        assert before["finished_at"] <= after["started_at"]

    ranked = trainer_cli("rank", "--experiment", "grid", "--evaluate", "--json", "--stride", "64",
                         "--max-length", "128", "--threshold", "10")
    assert ranked.returncode == 0, ranked.stderr
    result = json.loads(ranked.stdout)
    rows = result["rows"]
    assert sorted(r["run"] for r in rows) == NAMES and all(r["adapter"] == "final" for r in rows)
    assert all(r["learning_rate"] in (1e-3, 3e-3) and r["lora_rank"] in (4, 8) for r in rows)  # swept columns
    for row in rows:
        assert math.isfinite(row["held-out perplexity"]) and row["held-out perplexity"] > 1, row
        assert math.isfinite(row["forgetting ratio"]) and row["forgetting ratio"] > 0, row
    # best first: the adapters under the threshold by held-out perplexity, ranked 1, 2, ...
    within = [r for r in rows if r["within threshold"]]
    assert rows[:len(within)] == within
    assert [r["held-out perplexity"] for r in within] == sorted(r["held-out perplexity"] for r in within)
    assert [r["rank"] for r in within] == list(range(1, len(within) + 1))
    assert within, rows  # a ratio under 10 for a 2-step run of the tiny model
    assert result["sentence"].startswith(f"Best: {within[0]['run']} (final)")

    # Ranking again reads the stored evaluations: the same table, no new job.
    jobs_before = sorted((home / "results" / "jobs").iterdir())
    again = trainer_cli("rank", "--experiment", "grid", "--stride", "64", "--max-length", "128", "--threshold", "10")
    assert again.returncode == 0, again.stderr
    assert within[0]["run"] in again.stdout.splitlines()[1] and "Best:" in again.stdout
    assert sorted((home / "results" / "jobs").iterdir()) == jobs_before


def test_a_sweep_with_an_invalid_run_or_a_taken_name_writes_nothing(sweep_home):
    home = sweep_home
    bad = trainer_cli("sweep", "--sweep-file", "sweep.json", "--param", "overlap_len=16,64")
    assert bad.returncode == 2 and "error:" in bad.stderr  # overlap 64 is not below the cutoff 64
    assert [p.name for p in (home / "loras").iterdir()] == []
    (home / "loras" / "grid-lr3e-3-r8").mkdir()
    taken = trainer_cli("sweep", "--sweep-file", "sweep.json")
    assert taken.returncode == 2 and "grid-lr3e-3-r8 already exists" in taken.stderr, taken.stderr
    assert [p.name for p in (home / "loras").iterdir()] == ["grid-lr3e-3-r8"]
    assert not (home / "loras" / ".experiments").exists()
