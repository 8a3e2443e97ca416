"""Browser journey of the run queue (issue 13), in headless chromium against `streamlit run app.py`: two runs
started from the Train page one after the other; the second waits in the queue, shown in the queue panel with
its buttons, and starts by itself once the first has completed. The queue panel is screenshotted in the light
and the dark theme (kept in test-artifacts/ on failure, or always with LORA_DASHBOARD_KEEP_SCREENSHOTS=1)."""

from __future__ import annotations

import os
import re

import pytest

from trainer.runfiles import read_status

from .browser_helpers import CHROMIUM, SECOND, fill_tiny_run, main, metric, set_number, set_text

pytestmark = pytest.mark.browser

if not CHROMIUM.exists():
    if os.environ.get("LORA_DASHBOARD_REQUIRE_BROWSER"):
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install -y chromium")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)

from playwright.sync_api import expect  # noqa: E402

from .test_browser import browser_page, server  # noqa: E402,F401 - the fixtures of the main journey

FIRST, FIRST_STEPS = "queue-first", 60  # long enough to be live while the second run is filled in and started
SECOND_RUN, SECOND_STEPS = "queue-second", 4
WAIT = 60 * SECOND
END = 400 * SECOND  # a crowded 2-core machine takes 1-2 s a step of the tiny model


def fill_the_form(page, body) -> None:
    """A short run of the tiny model on the demo raw text."""
    fill_tiny_run(page, body, FIRST, FIRST_STEPS)
    set_number(body, "Batch size", 2)
    set_number(body, "Warmup steps", 1)
    body.get_by_role("tab", name="Basic").click()


def start(page, body, steps: int) -> None:
    expect(metric(page, "Total steps", body)).to_have_text(str(steps), timeout=WAIT)
    button = body.get_by_role("button", name="Start training")
    expect(button).to_be_enabled(timeout=WAIT)
    button.click()


def test_two_runs_started_from_the_train_page_run_one_after_the_other(home, server, browser_page):
    page, album = browser_page
    page.goto(server.url + "/train")
    body = main(page)
    expect(body.get_by_role("heading", name="Train", exact=True)).to_be_visible(timeout=WAIT)
    fill_the_form(page, body)
    start(page, body, FIRST_STEPS)
    expect(body.get_by_text(f"Started {FIRST}; it is shown under Runs below.")).to_be_visible(timeout=WAIT)

    # ---- the second Start, while the first is live: it waits in the queue --------------------------------
    set_text(body, "LoRA name", SECOND_RUN)
    set_number(body, "Max steps", SECOND_STEPS)
    expect(body.get_by_text(re.compile(rf"^{FIRST} is already running on the CPU; .* Start puts this one in the "
                                       rf"queue"))).to_be_visible(timeout=WAIT)
    expect(body.get_by_role("checkbox", name="Run beside the running one instead of queueing")).not_to_be_checked()
    start(page, body, SECOND_STEPS)
    first, second = home / "loras" / FIRST, home / "loras" / SECOND_RUN
    expect(body.get_by_text(f"{SECOND_RUN} is in the queue", exact=False)).to_be_visible(timeout=WAIT)
    assert (read_status(first) or {}).get("state") in ("queued", "running"), (
        f"the first run ended before the second was started ({read_status(first)}); raise FIRST_STEPS")
    assert (read_status(second) or {}).get("waiting"), read_status(second)
    row = body.get_by_text(re.compile(rf"{SECOND_RUN} · the CPU · start$"))
    expect(row).to_be_visible(timeout=WAIT)
    expect(body.get_by_text(re.compile(rf"^⏳ {SECOND_RUN}: queued"))).to_be_visible()  # the run shown below
    for name in ("Up", "Down", "Cancel", "Start now"):  # a button's name may begin with its icon's
        expect(body.get_by_role("button", name=re.compile(rf"(^|\s){name}$"))).to_be_visible()
    for name in ("Up", "Down"):  # the only one: nowhere to move
        expect(body.get_by_role("button", name=re.compile(rf"(^|\s){name}$"))).to_be_disabled()
    expect(body.get_by_text(re.compile(rf"^Start now runs a queued run at once, beside {FIRST}"))).to_be_visible()
    expect(body.get_by_text(f"Running now: {FIRST} · Waiting in the queue: {SECOND_RUN}", exact=True)).to_be_visible()
    row.scroll_into_view_if_needed()
    album.snap(page, "queue-light")
    page.emulate_media(color_scheme="dark")  # Streamlit follows the system's theme by default
    expect(page.get_by_test_id("stApp")).to_have_css("color-scheme", "dark", timeout=WAIT)
    row.scroll_into_view_if_needed()
    album.snap(page, "queue-dark")
    page.emulate_media(color_scheme="light")

    # ---- the first completes, and the second starts by itself -------------------------------------------
    expect(body.get_by_text(re.compile(rf"^\S+ {SECOND_RUN}: (running|completed)"))).to_be_visible(timeout=END)
    expect(row).to_have_count(0, timeout=WAIT)  # it left the queue
    done = read_status(first)
    assert done["state"] == "completed" and done["step"] == FIRST_STEPS, done
    later = read_status(second)
    assert later["state"] in ("queued", "running", "completed") and not later.get("waiting"), later
    assert later["started_at"] >= done["finished_at"], (done, later)
    expect(body.get_by_text(f"{SECOND_RUN}: completed")).to_be_visible(timeout=END)
    expect(body.get_by_text("Nothing is running now.", exact=True)).to_be_visible(timeout=WAIT)
    album.snap(page, "queue-done")
    expect(body.get_by_test_id("stException")).to_have_count(0)
