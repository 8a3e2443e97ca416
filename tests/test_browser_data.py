"""Browser end-to-end, the Data page's uploads: a ShareGPT .jsonl file and a CSV table uploaded through the
uploader in headless chromium, each previewed with its recognised-shape sentence and its sample count, as
the trainer's own preview gives them; then both seen again in the dark theme, and one deleted after a
confirmation. Screenshots of each, in the light and the dark theme, are kept in test-artifacts/<test>/ when
the test fails (or always, with LORA_DASHBOARD_KEEP_SCREENSHOTS set)."""

from __future__ import annotations

import json
import os
import re

import pytest

from .browser_helpers import CHROMIUM, CHROMIUM_ARGS, SECOND, Album, choose, main, metric
from .test_browser import server  # noqa: F401  (the app on a free port, its home the test's home)
from .test_shapes import ALPACA_ROWS, SYSTEM, TURNS, sharegpt

pytestmark = pytest.mark.browser

from playwright.sync_api import expect, sync_playwright  # noqa: E402  (test_browser skips without chromium)

WAIT = 60 * SECOND
SHAREGPT = "".join(json.dumps(row) + "\n" for row in (sharegpt([SYSTEM, *TURNS]), sharegpt(TURNS[:2]),
                                                        sharegpt(TURNS[2:]))).encode()
CSV = ("instruction,input,output\n" + "".join(f'"{r["instruction"]}","{r["input"]}","{r["output"]}"\n'
                                              for r in ALPACA_ROWS)).encode()
UPLOADS = [("chats.jsonl", SHAREGPT, "application/json"), ("alpaca.csv", CSV, "text/csv")]


@pytest.fixture
def browser(request, tmp_path, server):  # noqa: F811
    """Chromium, and an album of screenshots kept in test-artifacts/<test>/ when the test fails."""
    album = Album(tmp_path / "screenshots")
    failed_before = request.session.testsfailed
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        expect.set_options(timeout=30 * SECOND)
        try:
            yield chromium, album
        finally:
            failed = request.session.testsfailed > failed_before
            for context in chromium.contexts if failed else ():  # the tab that failed, as it was
                for page in context.pages:
                    album.snap(page, "at-failure")
            if failed or os.environ.get("LORA_DASHBOARD_KEEP_SCREENSHOTS"):
                (album.folder / "streamlit.log").write_text(server.log_tail(400))
                print(f"\nScreenshots of the upload journey: {album.keep(request.node.name)}")
            chromium.close()


def open_data_page(chromium, url: str, theme: str):
    """A new tab in the `theme` colour scheme (Streamlit follows the system's by default) on the Data page."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000}, color_scheme=theme)
    page = context.new_page()
    page.set_default_timeout(30 * SECOND)
    page.goto(url)
    expect(main(page).get_by_role("heading", name="Data")).to_be_visible(timeout=WAIT)
    return context, page


def expected(name: str, tokenizer):
    """What the trainer's own preview says of this dataset with the Data page's first options."""
    from trainer.data import build_samples
    from trainer.params import TrainingParameters

    return build_samples(TrainingParameters.from_dict({"dataset": name, "format": "alpaca-format"}), tokenizer)


def check_preview(page, name: str, want) -> None:
    body = main(page)
    with_errors = body.get_by_test_id("stAlertContentError")
    said = body.get_by_test_id("stAlertContentInfo").filter(has_text=want.shape[:60])
    expect(said).to_have_text(re.compile(rf"^\W*{re.escape(want.shape)}\s*$"), timeout=WAIT)  # after its icon
    expect(metric(page, "Samples", body)).to_have_text(f"{want.stats['samples']:,}", timeout=WAIT)
    expect(body.get_by_text(f"Samples 1–{want.stats['samples']} of {want.stats['samples']}.")).to_be_visible()
    expect(with_errors).to_have_count(0)
    expect(body.get_by_role("combobox", name="Dataset", exact=True)).to_have_value(name)


def upload(page, name: str, data: bytes, mime: str, album: Album) -> None:
    body = main(page)
    box = body.get_by_test_id("stExpander").filter(has_text="Upload a dataset or a format file")
    if not box.get_by_test_id("stFileUploaderDropzone").is_visible():  # closed (its file input is never visible)
        box.get_by_text("Upload a dataset or a format file").click()
    box.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(
        files=[{"name": name, "mimeType": mime, "buffer": data}])
    expect(box.get_by_role("textbox", name="Save as", exact=True)).to_have_value(name, timeout=WAIT)
    expect(box.get_by_role("radio", name="datasets/ (a dataset)")).to_be_checked()
    album.snap(page, f"upload-{name}")
    box.get_by_role("button", name="Save into datasets/").click()
    expect(body.get_by_text(re.compile(rf"Saved datasets/{re.escape(name)} \({len(data):,} bytes\)"))).to_be_visible(
        timeout=WAIT)


def test_upload_a_sharegpt_file_and_a_csv_table_and_preview_each(home, server, browser, tokenizer):  # noqa: F811
    chromium, album = browser
    context, page = open_data_page(chromium, server.url, "light")
    for name, data, mime in UPLOADS:
        upload(page, name, data, mime, album)
        assert (home / "datasets" / name).read_bytes() == data
        want = expected(name, tokenizer)
        assert want.samples and not want.problems, want.problems
        check_preview(page, name, want)
        album.snap(page, f"light-{name}")
    shapes = {name: expected(name, tokenizer).shape for name, _, _ in UPLOADS}
    assert shapes["chats.jsonl"].startswith("ShareGPT conversations (from/value): 3 rows")
    assert shapes["alpaca.csv"].startswith("CSV table with columns instruction, input, output: Format-file "
                                           "records: 2 rows")
    context.close()

    # The same previews in the dark theme (a new tab finds the files saved and the page as it was left).
    context, page = open_data_page(chromium, server.url, "dark")
    body = main(page)
    for name, _, _ in UPLOADS:
        choose(page, body, "Dataset", name)
        check_preview(page, name, expected(name, tokenizer))
        album.snap(page, f"dark-{name}")

    # Delete the table again, after a confirmation: the picker moves on without a reload.
    box = body.get_by_test_id("stExpander").filter(has_text="Delete a dataset or a format file")
    box.get_by_text("Delete a dataset or a format file").click()
    choose(page, box, "File", "datasets/alpaca.csv")
    box.get_by_role("button", name="Delete", exact=True).click()
    expect(box.get_by_text("Really delete datasets/alpaca.csv? It cannot be undone.")).to_be_visible(timeout=WAIT)
    expect(box.get_by_role("button", name="Delete", exact=True)).to_have_count(0, timeout=WAIT)  # once the run ends
    album.snap(page, "dark-delete-asked")
    assert (home / "datasets" / "alpaca.csv").exists()
    box.get_by_role("button", name="Delete datasets/alpaca.csv").click()
    expect(box.get_by_text("Deleted datasets/alpaca.csv.")).to_be_visible(timeout=WAIT)
    assert not (home / "datasets" / "alpaca.csv").exists()
    picker = body.get_by_role("combobox", name="Dataset", exact=True)
    expect(picker).not_to_have_value("alpaca.csv", timeout=WAIT)
    picker.click()
    expect(page.get_by_role("option", name="chats.jsonl", exact=True)).to_be_visible()
    expect(page.get_by_role("option", name="alpaca.csv", exact=True)).to_have_count(0)
    page.keyboard.press("Escape")
    expect(metric(page, "Samples", body)).to_be_visible(timeout=WAIT)
    album.snap(page, "dark-deleted")
