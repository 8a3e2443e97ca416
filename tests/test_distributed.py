"""Several processes through torchrun on the CPU (gloo): same curve as one process, stop, a failing rank (the run
names the rank that broke, whatever order the processes die in)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from trainer import train as trainer_train
from trainer.distributed import lost_a_peer
from trainer.home import CODE_ROOT
from trainer.runfiles import read_metrics, read_status, request_stop, update_status
from trainer.runs import free_port

from .trainhelpers import metrics_of, run_trainer, status_of, wait_for, write_run

# Dropout off: each process draws its own dropout masks, which a single process would draw differently.
SAME_AS_ONE = dict(micro_batch_size=2, batch_size=4, lora_dropout=0.0, seed=11)


def torchrun(run_dir, processes=2, env_extra=None, background=False):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "trainer", "train", "--run-dir", str(run_dir)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    if background:
        log = open(run_dir / "train.log", "a")
        return subprocess.Popen(command, cwd=CODE_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return subprocess.run(command, cwd=CODE_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_give_the_same_loss_curve_as_one(home):
    one = write_run(home, "one", max_steps=6, **SAME_AS_ONE)
    assert run_trainer(one).returncode == 0
    two = write_run(home, "two", max_steps=6, num_processes=2, **SAME_AS_ONE)
    result = torchrun(two)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    expected = [r for r in metrics_of(one) if "loss" in r]
    got = [r for r in metrics_of(two) if "loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"])
        assert b["tokens"] == a["tokens"], "both processes' tokens are counted once each"
    status = status_of(two)
    assert status["state"] == "completed" and status["world_size"] == 2
    assert (two / "adapter_model.safetensors").is_file()


def test_batch_must_divide_by_micro_batch_times_processes(home):
    run_dir = write_run(home, "uneven", max_steps=2, micro_batch_size=2, batch_size=2)  # 2 % (2 x 2) != 0
    result = torchrun(run_dir)
    assert result.returncode != 0
    assert "micro batch size x processes" in status_of(run_dir)["error"]


def test_a_stopped_two_process_run_ends_both_processes(home):
    run_dir = write_run(home, "stop2", max_steps=3000, num_processes=2, **SAME_AS_ONE)
    process = torchrun(run_dir, background=True)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and read_metrics(run_dir), timeout=180,
             what="the first step")
    request_stop(run_dir)
    assert process.wait(timeout=120) == 0
    status = status_of(run_dir)
    assert status["state"] == "stopped" and status["step"] < 3000
    assert (run_dir / "adapter_model.safetensors").is_file()
    leftover = subprocess.run(["pgrep", "-f", f"--run-dir {run_dir}"], capture_output=True, text=True).stdout
    assert leftover.strip() == "", "no trainer process is left"


def test_a_failing_rank_fails_the_run_with_its_message(home):
    run_dir = write_run(home, "fail2", max_steps=50, num_processes=2, **SAME_AS_ONE)
    result = torchrun(run_dir, env_extra={"LORA_DASHBOARD_FAULT": "1:3:disk on fire"})
    assert result.returncode != 0
    status = status_of(run_dir)
    assert status["state"] == "failed"
    assert status["failed_rank"] == 1
    assert "Rank 1 of 2 failed" in status["error"] and "disk on fire" in status["error"]


class Rank:
    """What failure recording reads of trainer.distributed.Distributed: one rank of a two-process run."""

    def __init__(self, rank: int, world: int = 2):
        self.rank, self.world, self.enabled, self.is_main = rank, world, True, rank == 0


def _run_folder(tmp_path, name="race"):
    run_dir = tmp_path / "loras" / name
    run_dir.mkdir(parents=True)
    update_status(run_dir, state="running", failed_rank=None, error=None)
    return run_dir


def test_the_first_failure_recorded_wins(tmp_path):
    run_dir = _run_folder(tmp_path)
    trainer_train._record_failure(run_dir, Rank(1), "RuntimeError: disk on fire")
    trainer_train._record_failure(run_dir, Rank(0), "RuntimeError: Connection closed by peer")
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["failed_rank"] == 1
    assert status["error"] == "Rank 1 of 2 failed: RuntimeError: disk on fire"


def test_a_rank_that_lost_its_peer_waits_for_the_peers_own_failure(tmp_path):
    """Whatever order the processes die in: the peer's report, arriving later, still names the run's failure."""
    run_dir = _run_folder(tmp_path)
    late = threading.Timer(0.5, trainer_train._record_failure, (run_dir, Rank(1), "RuntimeError: disk on fire"))
    late.start()
    trainer_train._record_failure(run_dir, Rank(0), "RuntimeError: Connection closed by peer", lost_peer=True)
    late.join()
    status = read_status(run_dir)
    assert status["failed_rank"] == 1 and "disk on fire" in status["error"]


def test_a_rank_that_lost_its_peer_reports_itself_when_no_failure_arrives(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_train, "PEER_FAILURE_WAIT_S", 0.2)
    run_dir = _run_folder(tmp_path)
    trainer_train._record_failure(run_dir, Rank(0), "RuntimeError: Connection closed by peer", lost_peer=True)
    status = read_status(run_dir)
    assert status["failed_rank"] == 0 and "Rank 0 of 2 failed" in status["error"]


def test_rank_0_progress_writes_never_overwrite_a_failure(tmp_path):
    """Rank 0 writes its step while another rank records its failure: neither write is lost."""
    for attempt in range(5):
        run_dir = _run_folder(tmp_path, f"race{attempt}")
        progress = threading.Thread(target=lambda: [trainer_train._set_status(run_dir, step=s) for s in range(40)])
        progress.start()
        time.sleep(0.01 * attempt)
        trainer_train._record_failure(run_dir, Rank(1), "RuntimeError: disk on fire")
        progress.join()
        status = read_status(run_dir)
        assert status["state"] == "failed" and status["failed_rank"] == 1 and status["step"] == 39


def test_only_a_failed_collective_counts_as_a_lost_peer():
    import torch.distributed as dist

    assert lost_a_peer(dist.DistNetworkError("Connection reset by peer"))
    assert not lost_a_peer(RuntimeError("disk on fire"))
    try:
        raise RuntimeError("out of memory")
    except RuntimeError as own:
        assert not lost_a_peer(own)


def test_fsdp_shards_the_model_and_trains_like_one_process(home):
    """FSDP (FSDP2 on gloo here): the same curve as one process, an adapter PEFT loads, and resume works."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    one = write_run(home, "one", max_steps=4, **SAME_AS_ONE)
    assert run_trainer(one).returncode == 0
    sharded = write_run(home, "fsdp", max_steps=4, save_steps=2, num_processes=2, distributed_strategy="fsdp",
                        **SAME_AS_ONE)
    result = torchrun(sharded, env_extra={"LORA_DASHBOARD_FAULT": "0:3:stop here"})
    assert result.returncode != 0 and (sharded / "checkpoint-2").is_dir()
    command_resume = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                      "127.0.0.1", "--master_port", str(free_port()), "-m", "trainer", "train", "--run-dir",
                      str(sharded), "--resume"]
    resumed = subprocess.run(command_resume, cwd=CODE_ROOT, env=dict(os.environ), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    expected = [r for r in metrics_of(one) if "loss" in r]
    got = [r for r in metrics_of(sharded) if "loss" in r]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    base = AutoModelForCausalLM.from_pretrained(home / "models" / "tiny-llama")
    from_one = PeftModel.from_pretrained(base, one).eval()
    base2 = AutoModelForCausalLM.from_pretrained(home / "models" / "tiny-llama")
    from_fsdp = PeftModel.from_pretrained(base2, sharded).eval()
    ids = torch.tensor([[1, 20, 300, 4000]])
    with torch.no_grad():
        assert torch.allclose(from_one(input_ids=ids).logits, from_fsdp(input_ids=ids).logits, atol=1e-4)
