"""Helpers for the browser end-to-end tests: a Streamlit server on a free localhost port, headless Debian
chromium through Playwright, Streamlit widget locators, and screenshots kept when a test fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from trainer.home import CODE_ROOT, HOME_ENV

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = CODE_ROOT / "test-artifacts"  # gitignored
SECOND = 1000  # Playwright timeouts are in milliseconds


# ---- the server ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StreamlitServer:
    """`streamlit run app.py` on 127.0.0.1:PORT with LORA_DASHBOARD_HOME=home, its output in a log file."""

    def __init__(self, home: Path, log_path: Path):
        self.home, self.log_path = Path(home), Path(log_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "StreamlitServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{HOME_ENV: str(self.home)})
        command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(self.port),
                   "--server.address", "127.0.0.1", "--server.headless", "true",
                   "--browser.gatherUsageStats", "false"]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=CODE_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"streamlit did not answer on {self.url} within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def end_processes_of(home: Path) -> list[int]:
    """SIGTERM the process groups of trainers and evaluation jobs still live under `home` (a failed test
    must not leave them running). Only processes whose command line names this home folder are touched."""
    ended = []
    for status_file in list(home.glob("loras/*/status.json")) + list(home.glob("results/jobs/*/status.json")):
        try:
            status = json.loads(status_file.read_text())
        except (OSError, ValueError):
            continue
        pid = status.get("pid")
        if status.get("state") not in ("queued", "running") or not isinstance(pid, int):
            continue
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(home) not in command:
            continue
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)
            ended.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return ended


# ---- screenshots -------------------------------------------------------------------------------
class Album:
    """A screenshot of each page the journey reaches (and of the page at a failure), plus the server log.
    They are written to a temporary folder and copied to test-artifacts/<test>/ when the test fails."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def snap(self, page, name: str) -> Path | None:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{re.sub(r'[^A-Za-z0-9_-]+', '-', name)}.png"
        try:
            # Streamlit scrolls inside its own container, so a full-page screenshot would show only the
            # window: make the window as tall as the content for the screenshot, then put it back.
            size = page.viewport_size
            height = page.evaluate("""() => Math.max(...['stMain', 'stAppViewContainer', 'stSidebarContent']
                .map(id => document.querySelector(`[data-testid="${id}"]`))
                .filter(Boolean).map(e => e.scrollHeight), document.body.scrollHeight)""")
            if size and height > size["height"]:
                page.set_viewport_size({"width": size["width"], "height": min(int(height), 8000)})
            try:
                page.screenshot(path=str(path), full_page=True, timeout=20 * SECOND)
            finally:
                if size:
                    page.set_viewport_size(size)
        except Exception as exc:  # the page may be gone; a screenshot must never hide the real failure
            (path.with_suffix(".txt")).write_text(f"no screenshot: {exc}")
            return None
        return path

    def keep(self, test_name: str) -> Path:
        target = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "-", test_name)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(self.folder, target)
        return target


# ---- Streamlit widgets ---------------------------------------------------------------------------
def main(page):
    return page.get_by_test_id("stMain")


def sidebar_link(page, title: str):
    return page.get_by_test_id("stSidebarNav").get_by_role("link", name=title)


def number_input(scope, label: str):
    return scope.get_by_role("spinbutton", name=label, exact=True)


def set_number(scope, label: str, value) -> None:
    field = number_input(scope, label)
    field.fill(str(value))
    field.press("Enter")  # Streamlit commits a number input on Enter (or blur)


def set_text(scope, label: str, value: str) -> None:
    field = scope.get_by_role("textbox", name=label, exact=True)
    field.fill(value)
    field.press("Enter")


def choose(page, scope, label: str, option: str, timeout: float = 30 * SECOND) -> None:
    """Pick `option` in the selectbox `label` (a combobox; its options open in a popover). A rerun of the
    page can close the popover just after it opened, so the click is tried again until the timeout."""
    box = scope.get_by_role("combobox", name=label, exact=True)
    item = page.get_by_role("option", name=option, exact=True)
    deadline = time.monotonic() + timeout / SECOND
    while True:
        box.click(timeout=timeout)
        try:
            item.click(timeout=3 * SECOND)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            page.keyboard.press("Escape")


def metric(page, label: str, scope=None):
    """The value element of the st.metric named `label` (in `scope`, the whole page by default)."""
    name = page.get_by_test_id("stMetricLabel").filter(has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))
    return (scope or page).get_by_test_id("stMetric").filter(has=name).get_by_test_id("stMetricValue")


def fill_tiny_run(page, body, name: str, steps: int) -> None:
    """The Train form for a short run of the tiny model on the demo raw text, up to the micro batch (2); the
    batch size and what follows are the caller's. Leaves the Optimisation tab open."""
    set_text(body, "LoRA name", name)
    choose(page, body, "Base model", "tiny-llama")
    set_number(body, "Max steps", steps)
    body.get_by_role("tab", name="Data").click()
    choose(page, body, "Raw text file or folder", "user-guide.txt")
    set_number(body, "Cutoff length (tokens)", 64)
    set_number(body, "Overlap length (tokens)", 16)
    body.get_by_role("tab", name="Optimisation").click()
    set_number(body, "Micro batch size", 2)
