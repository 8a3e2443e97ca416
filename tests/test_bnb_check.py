"""8-bit / 4-bit choices are checked before launch: a clear message where bitsandbytes cannot run."""

from __future__ import annotations

from trainer import models


def test_bitsandbytes_runs_here_so_no_problem_is_reported():
    assert models.bitsandbytes_problem("4bit", "adamw_torch") is None
    assert models.bitsandbytes_problem("full", "adamw_bnb_8bit") is None


def test_a_broken_bitsandbytes_gives_a_sentence_naming_the_choice(monkeypatch):
    monkeypatch.setattr(models, "_bitsandbytes_error", lambda: "OSError: libbitsandbytes_cpu.so not found")
    message = models.bitsandbytes_problem("8bit", "adamw_torch")
    assert "8bit base model needs bitsandbytes" in message and "libbitsandbytes_cpu.so" in message
    assert "adamw_bnb_8bit optimiser" in models.bitsandbytes_problem("full", "adamw_bnb_8bit")
    assert models.bitsandbytes_problem("full", "adamw_torch") is None
