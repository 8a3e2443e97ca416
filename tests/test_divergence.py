"""The divergence rule (trainer/divergence.py) on recorded curves, both ways, and the trainer using it: a
learning rate of 1.0 ends the run failed with the sentence and `diverged: true`; a normal one completes."""

from __future__ import annotations

import re

import pytest

from trainer.batching import LORA_LEARNING_RATES, rate_text
from trainer.checkpoints import list_checkpoints
from trainer.divergence import DivergenceWatch, loss_problem

from .trainhelpers import metrics_of, run_trainer, status_of, write_run

# The issue's run: SmolLM2-135M at learning rate 1.0 (its gradient norm reached 9.5e9; the loss alone is judged here).
ISSUE_LOSSES = [4.39, 14.06, 19.21, 17.65]
# Recorded with the tiny model pretrained for 150 steps of 8 rows (like `pretrained_tiny_dir` below, longer), the
# trainer's tiny parameters (tests/trainhelpers.py) and learning rate 1.0: (loss, grad norm) per step.
TINY_LR_1 = [(4.467, 0.162), (4.367, 0.113), (6.863, 8.11), (21.849, 2.55), (13.949, 10.4)]
# The same model at learning rate 3e-2 (high, but it trains): the loss wobbles upward for steps 3-5 and 6-8.
TINY_LR_3E2 = [(4.467, 0.162), (4.367, 0.113), (4.314, 0.142), (4.357, 0.514), (4.454, 0.242), (4.182, 0.307),
               (4.546, 0.443), (4.632, 0.252), (4.161, 0.227), (4.536, 0.24), (4.125, 0.192), (4.156, 0.244),
               (3.827, 0.272), (4.336, 0.311), (3.635, 0.264), (4.405, 0.201), (4.119, 0.266), (4.694, 0.304),
               (4.255, 0.222), (4.382, 0.195)]
# And at 3e-4, LoRA's usual rate.
TINY_LR_3E4 = [(4.467, 0.162), (4.367, 0.113), (4.321, 0.159), (4.315, 0.143), (4.489, 0.167), (4.177, 0.179),
               (4.458, 0.188), (4.634, 0.124), (4.191, 0.127), (4.568, 0.161), (4.153, 0.134), (4.178, 0.141),
               (3.864, 0.204), (4.335, 0.163), (3.637, 0.123), (4.392, 0.114), (4.088, 0.136), (4.739, 0.177),
               (4.297, 0.193), (4.37, 0.129)]


def first_verdict(curve):
    """(step, verdict) of the first step the watch calls diverged, or None."""
    watch = DivergenceWatch()
    for step, (loss, grad_norm) in enumerate(curve, start=1):
        if verdict := watch.observe(step, loss, grad_norm):
            return step, verdict
    return None


def test_the_issues_curve_diverges_with_the_sentence():
    step, verdict = first_verdict([(loss, 1.0) for loss in ISSUE_LOSSES])
    assert step == 4 and verdict.since == 2
    assert verdict.what == "The loss rose from 4.39 to 19.2 in 3 steps"
    sentence = verdict.sentence(1.0, "checkpoint-1")
    low, high = (rate_text(r) for r in LORA_LEARNING_RATES)
    assert sentence == (f"The loss rose from 4.39 to 19.2 in 3 steps: the learning rate 1 is far too high for LoRA; "
                        f"try {low} to {high}. The last good checkpoint is checkpoint-1.")
    assert "checkpoint" not in verdict.sentence(1.0, None), "no checkpoint is named when none exists"


def test_an_exploding_gradient_norm_diverges_at_once():
    step, verdict = first_verdict([(4.39, 0.9), (4.41, 1.1), (4.5, 9.5e9)])
    assert step == 3 and "gradient norm exploded to 9.5e+09 at step 3" in verdict.what
    step, verdict = first_verdict([(4.39, 0.9), (4.41, float("inf"))])
    assert step == 2 and "gradient norm became inf" in verdict.what
    step, verdict = first_verdict([(4.39, 0.9), (4.41, float("nan"))])
    assert step == 2 and "nan" in verdict.what


def test_a_recorded_blow_up_diverges_and_dates_it():
    step, verdict = first_verdict(TINY_LR_1)
    assert step == 5 and verdict.since == 3
    assert verdict.what == "The loss rose from 4.42 to 21.8 in 3 steps"


@pytest.mark.parametrize("curve", [TINY_LR_3E2, TINY_LR_3E4], ids=["lr 3e-2", "lr 3e-4"])
def test_recorded_curves_that_wobble_upward_do_not_diverge(curve):
    losses = [loss for loss, _ in curve]
    assert any(losses[i] < losses[i + 1] < losses[i + 2] for i in range(len(losses) - 2)), "it does wobble upward"
    assert first_verdict(curve) is None


def test_a_slow_rise_and_short_spikes_are_not_failures():
    slow = [(2.0 + 0.015 * i, 0.5) for i in range(60)]  # 2.0 -> 2.9: learning badly, not exploding
    assert first_verdict(slow) is None
    spikes = [(2.0, 0.5)] * 5 + [(6.0, 0.5)] * 2 + [(2.1, 0.5)] * 5 + [(7.0, 0.5)] * 2 + [(2.0, 0.5)] * 5
    assert first_verdict(spikes) is None, "two high steps, then back: a wobble"
    assert first_verdict(spikes[:5] + [(6.0, 0.5)] * 3) is not None, "three in a row: diverged"
    # Far above needs both 1.5 x the start and 1 nat more: from a low start, 1.5x alone is not enough.
    low = [(0.4, 0.5)] * 3 + [(0.9, 0.5)] * 10
    assert first_verdict(low) is None
    # A gradient norm 500x its median, or 1000x but small in absolute terms, is not an explosion.
    assert first_verdict([(2.0, 0.2)] * 5 + [(2.0, 100.0)] + [(2.0, 0.2)] * 3) is None
    assert first_verdict([(2.0, 0.01)] * 5 + [(2.0, 50.0)] + [(2.0, 0.01)] * 3) is None


def test_high_steps_do_not_raise_the_start():
    watch = DivergenceWatch()
    watch.observe(1, 2.0, 0.5)
    watch.observe(2, 9.0, 0.5)  # high: judged against 2.0, and not averaged into the start
    assert watch.start == 2.0 and watch.suspect
    watch.observe(3, 2.2, 0.5)
    assert watch.start == pytest.approx(2.1) and not watch.suspect


def test_the_sentence_names_the_usual_range_by_how_high_the_rate_is():
    verdict = first_verdict([(loss, 1.0) for loss in ISSUE_LOSSES])[1]
    assert "far too high for LoRA" in verdict.sentence(0.5, None)
    assert "above LoRA's usual" in verdict.sentence(LORA_LEARNING_RATES[1] * 2, None)
    assert "lower the learning rate (now 2e-4)" in verdict.sentence(2e-4, None)


def test_loss_problems_are_explained():
    assert loss_problem(2.5, 10) is None
    assert loss_problem(1e-9, 10) is None
    assert "exactly 0.0" in loss_problem(0.0, 3) and "broken" in loss_problem(0.0, 3)
    assert "diverged" in loss_problem(float("nan"), 12) and "learning rate" in loss_problem(float("nan"), 12)
    assert "diverged" in loss_problem(float("inf"), 12)
    assert "first step" in loss_problem(float("nan"), 1)


# ---- the trainer -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained_tiny_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model trained briefly (all its weights) on the user guide, so that its loss starts near 6, well
    below where it can blow up to: the random tiny model's logits are so small that its loss sits at
    ln(vocabulary) = 10.8 whatever LoRA does."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from trainer.home import CODE_ROOT

    folder = tmp_path_factory.mktemp("models") / "tiny-trained"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    ids = tokenizer((CODE_ROOT / "datasets" / "user-guide.txt").read_text(encoding="utf-8"),
                    return_tensors="pt").input_ids[0]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(50):  # the loss falls from 10.8 to about 6
        starts = torch.randint(0, len(ids) - 65, (4,))
        batch = torch.stack([ids[s:s + 64] for s in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def trained_home(home, pretrained_tiny_dir):
    target = home / "models" / "tiny-trained"
    target.mkdir()
    for item in pretrained_tiny_dir.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return home


def test_learning_rate_1_fails_as_diverged_and_keeps_its_checkpoints(trained_home):
    run_dir = write_run(trained_home, "lr-one", base_model="tiny-trained", learning_rate=1.0, max_steps=30,
                        save_steps=2, target_modules="q-v")  # the curves these tests were measured on
    result = run_trainer(run_dir)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    status = status_of(run_dir)
    assert status["state"] == "failed" and status["diverged"] is True
    error = status["error"]
    assert re.match(r"The (loss rose from [\d.]+ to [\d.]+ in \d+ steps|gradient norm)", error), error
    assert "the learning rate 1 is far too high for LoRA; try" in error
    assert status["step"] < 30, "the run ended when it diverged, not at its last step"
    assert not (run_dir / "adapter_model.safetensors").exists(), "a diverged run saves no adapter"
    # The checkpoints it had are kept, none is written after the divergence, and the good one is named.
    steps = [int(c.name.split("-")[1]) for c in list_checkpoints(run_dir)]
    assert steps and max(steps) < status["step"]
    named = re.search(r"The last good checkpoint is (checkpoint-\d+)\.", error)
    assert named and (run_dir / named.group(1)).is_dir()
    losses = [r["loss"] for r in metrics_of(run_dir) if "loss" in r]
    assert len(losses) == status["step"], "every step up to the divergence has its metrics line"


def test_a_normal_learning_rate_that_wobbles_upward_completes(trained_home):
    run_dir = write_run(trained_home, "lr-normal", base_model="tiny-trained", learning_rate=3e-4, max_steps=20,
                        target_modules="q-v")
    result = run_trainer(run_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    status = status_of(run_dir)
    assert status["state"] == "completed" and status["diverged"] is False
    losses = [r["loss"] for r in metrics_of(run_dir) if "loss" in r]
    assert len(losses) == 20
    assert any(losses[i] < losses[i + 1] < losses[i + 2] for i in range(len(losses) - 2)), \
        "the test needs a curve that rises for a few steps"
