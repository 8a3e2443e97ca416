"""Security (issue 5, item 4): localhost only, names and paths confined to the home folders, uploads limited
and written only into datasets/, checkpoints and adapters loaded without running code, trust_remote_code off
unless ticked.

Already covered elsewhere, not repeated here: bad LoRA names (test_params.py::test_bad_lora_names, and on the
Train page test_train_page.py::test_bad_names_are_refused), the upload "Save as" box refusing `../escape.txt`,
hidden names, other endings and NUL bytes (test_data_page.py::test_upload_refuses_unsafe_names), export names
(test_export.py::test_export_never_overwrites_and_checks_names).
"""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from trainer.errors import DashboardError
from trainer.home import CODE_ROOT, check_name, resolve_inside, resolve_user_path
from trainer.params import TrainingParameters
from trainer.runfiles import read_status
from trainer.runs import free_port, launch

from .evalhelpers import copy_run, trained_run_source
from .homefiles import snapshot
from .trainhelpers import wait_for

CONFIG = CODE_ROOT / ".streamlit" / "config.toml"
DATA_PAGE = str(CODE_ROOT / "views" / "data.py")
TRAIN_PAGE = str(CODE_ROOT / "views" / "train.py")
SOURCE_DIRS = [CODE_ROOT / "trainer", CODE_ROOT / "views"]


def sources() -> list[Path]:
    return [CODE_ROOT / "app.py"] + [p for d in SOURCE_DIRS for p in sorted(d.rglob("*.py"))]


# ---- the server listens on 127.0.0.1 only --------------------------------------------------------
def test_config_binds_to_localhost_and_limits_uploads():
    config = tomllib.loads(CONFIG.read_text(encoding="utf-8"))
    server = config["server"]
    assert server["address"] == "127.0.0.1"
    assert 1 <= server["maxUploadSize"] <= 500, "uploads are limited (MB)"
    # Streamlit's own protections stay on.
    assert server.get("enableXsrfProtection", True) is True
    assert server.get("enableCORS", True) is True
    assert config.get("browser", {}).get("gatherUsageStats") is False
    makefile = (CODE_ROOT / "Makefile").read_text()
    assert "--server.address 127.0.0.1" in makefile


def listening_addresses(port: int) -> list[str]:
    """Local addresses of sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    words = [bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8)]
                    found.append(socket.inet_ntop(socket.AF_INET6, b"".join(words)))
    return found


def outward_address() -> str | None:
    """This machine's address on its network (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.123", 9))
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_the_server_listens_on_localhost_only(home):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}  # only config.toml decides
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port)],
                              cwd=CODE_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        def healthy():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                    return response.read() == b"ok"
            except OSError:
                assert server.poll() is None, "the server ended"
                return False

        wait_for(healthy, timeout=90, interval=0.3, what="the Streamlit server")
        assert listening_addresses(port) == ["127.0.0.1"]
        address = outward_address()
        if address is not None:
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=3).close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# ---- names and paths stay inside the home folders -------------------------------------------------
@pytest.mark.parametrize("relative, message", [
    ("../evil.txt", "starts with a dot"),
    ("sub/../../evil.txt", "starts with a dot"),
    ("..", "starts with a dot"),
    ("/etc/passwd", "is absolute"),
    ("//etc/passwd", "is absolute"),
    ("x\x00.txt", "NUL byte"),
    ("\x00", "NUL byte"),
    ("CON", "reserved device name"),
    ("con.txt", "reserved device name"),
    ("sub/LPT1.json", "reserved device name"),
    ("aux", "reserved device name"),
    (".git", "hidden names are not allowed"),
    (".git/config", "hidden names are not allowed"),
    (".env", "hidden names are not allowed"),
    ("..\\evil.txt", "path separator"),
    ("~/evil.txt", "may only use"),
    ("$HOME", "may only use"),
    ("a\tb.txt", "may only use"),
    ("evil\u2215x.txt", "may only use"),  # a division slash that looks like /
    ("", "is empty"),
    ("  ", "is empty"),
    (" /etc/passwd", "is empty"),  # the leading " " part
    ("x" * 101, "at most 100"),
])
def test_resolve_inside_refuses_escapes_and_odd_names(tmp_path, relative, message):
    base = tmp_path / "datasets"
    base.mkdir()
    with pytest.raises(DashboardError, match=message):
        resolve_inside(base, relative, "file name")


def test_resolve_inside_follows_symlinks_before_the_check(tmp_path):
    base, outside = tmp_path / "home" / "datasets", tmp_path / "outside"
    base.mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (base / "inside.txt").write_text("fine")
    (base / "link-out.txt").symlink_to(outside / "secret.txt")
    (base / "dangling-out.txt").symlink_to(outside / "not-yet.txt")
    (base / "dir-out").symlink_to(outside, target_is_directory=True)
    (base / "up").symlink_to("..", target_is_directory=True)
    (base / "link-in.txt").symlink_to(base / "inside.txt")
    for name in ("link-out.txt", "dangling-out.txt", "dir-out/secret.txt", "dir-out", "up/datasets/../x",
                 "up/models"):
        with pytest.raises(DashboardError, match="points outside|starts with a dot"):
            resolve_inside(base, name, "dataset")
    assert resolve_inside(base, "link-in.txt") == (base / "inside.txt").resolve()
    assert resolve_inside(base, "sub/new.txt") == base.resolve() / "sub" / "new.txt"
    assert resolve_inside(base, "inside.txt\n") == (base / "inside.txt").resolve(), "the checked name is used"


@pytest.mark.parametrize("name", ["CON", "nul.txt", "COM1.json", ".git", ".", "..", "a/b", "a\\b", "x\x00",
                                  "-rf", " ", "x" * 101])
def test_check_name_refuses_odd_file_names(name):
    with pytest.raises(DashboardError):
        check_name(name, "file name")


def test_command_line_paths_refuse_nul_bytes(home):
    for kind in ("dataset", "format", "lora", "model"):
        with pytest.raises(DashboardError, match="NUL"):
            resolve_user_path("x\x00/../../etc/passwd", kind)


def data_page() -> AppTest:
    at = AppTest.from_file(DATA_PAGE, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.mark.parametrize("upload_name", ["../evil.txt", "/tmp/evil.txt", "..\\evil.txt", "CON.txt", ".bashrc.txt"])
def test_an_upload_named_to_escape_is_refused(home, tmp_path, upload_name):
    """The uploaded file's own name (what the browser sends) is refused as it comes, without editing it."""
    before_home, before_tmp = snapshot(home), snapshot(tmp_path)
    at = data_page()
    at.file_uploader[0].set_value((upload_name, b"payload", "text/plain")).run()
    assert not at.exception, at.exception
    save = at.button(key="dp_up_save")
    if not save.disabled:
        save.click().run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error], "the name must be refused with a message"
    assert not any(s.value.startswith("Saved") for s in at.success)
    assert snapshot(home) == before_home and snapshot(tmp_path) == before_tmp
    assert not Path("/tmp/evil.txt").exists()


@pytest.mark.parametrize("upload_name, message", [("evil.py", "Invalid file extension"),
                                                   ("evil.txt\x00.json", "null bytes")])
def test_streamlit_itself_refuses_other_endings_and_nul_bytes(home, tmp_path, upload_name, message):
    """The uploader's `type=` list and NUL bytes are enforced by the Streamlit server before the page runs."""
    before = snapshot(tmp_path)
    at = data_page()
    at.file_uploader[0].set_value((upload_name, b"payload", "text/plain")).run()
    assert any(message in e.value for e in at.exception), at.exception
    assert snapshot(tmp_path) == before


def test_an_upload_through_a_symlink_out_of_datasets_is_refused(home, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("original")
    (home / "datasets" / "linked.txt").symlink_to(outside / "target.txt")
    (home / "datasets" / "dangling.txt").symlink_to(outside / "created.txt")
    for name in ("linked.txt", "dangling.txt"):
        at = data_page()
        at.file_uploader[0].set_value((name, b"overwritten", "text/plain")).run()
        replace = [c for c in at.checkbox if c.label == "Replace the existing file"]
        if replace:
            replace[0].check().run()
        at.button(key="dp_up_save").click().run()
        assert not at.exception, at.exception
        assert any("points outside" in e.value for e in at.error), [e.value for e in at.error]
    assert (outside / "target.txt").read_text() == "original"
    assert not (outside / "created.txt").exists()
    assert (home / "datasets" / "linked.txt").is_symlink() and (home / "datasets" / "dangling.txt").is_symlink()


def test_a_good_upload_lands_in_datasets_only(home):
    before = set(snapshot(home))
    at = data_page()
    at.file_uploader[0].set_value(("notes 2.txt", b"Some text to train on.\n", "text/plain")).run()
    at.button(key="dp_up_save").click().run()
    assert not at.exception, at.exception
    assert set(snapshot(home)) - before == {"datasets/notes 2.txt"}
    assert not [p for p in (home / "datasets").iterdir() if p.name.endswith(".uploading")]


# ---- checkpoints and adapters are data, never code ------------------------------------------------
class Payload:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({self.marker!r}).touch()",)


def malicious_file(path: Path, marker: Path) -> None:
    import torch

    torch.save({"state": {0: {"step": Payload(marker)}}, "param_groups": []}, path)


def test_the_payload_would_run_code_if_loaded_unsafely(tmp_path):
    """The check below means something: this file really runs code when loaded without weights_only."""
    import torch

    marker = tmp_path / "proof"
    malicious_file(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_resume_refuses_a_checkpoint_whose_optimizer_file_runs_code(home, tiny_model_dir, tmp_path_factory, tmp_path):
    run_dir = copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home, "poisoned")
    marker = tmp_path / "code-ran"
    malicious_file(run_dir / "checkpoint-2" / "optimizer.pt", marker)
    (run_dir / "status.json").unlink()
    params = TrainingParameters.from_file(run_dir / "training_parameters.json")
    params.lora_name = "poisoned"
    launch(params, mode="resume", checkpoint="checkpoint-2")
    status = wait_for(lambda: (s := read_status(run_dir) or {}).get("state") in ("completed", "stopped", "failed")
                      and s, timeout=180, what="the resume to end")
    assert not marker.exists(), "the checkpoint ran code"
    assert status["state"] == "failed"
    assert "optimizer.pt holds Python objects" in status["error"], status["error"]


def test_a_pickled_adapter_is_never_loaded(home, tmp_path):
    """An adapter folder with adapter_model.bin (a pickle) instead of safetensors: the evaluation path refuses it
    outright, and peft's own loader (used on resume) reads .bin files with weights_only."""
    from peft.utils import load_peft_weights

    from trainer.models import attach_adapter

    adapter = home / "loras" / "pickled"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    marker = tmp_path / "code-ran"
    malicious_file(adapter / "adapter_model.bin", marker)
    with pytest.raises(DashboardError, match="only safetensors adapters are loaded"):
        attach_adapter(object(), adapter)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_peft_weights(str(adapter))
    assert not marker.exists()


def calls(tree_: ast.AST, module: str, function: str):
    for node in ast.walk(tree_):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == function
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
            yield node


def test_no_unsafe_loading_in_the_code():
    torch_loads = 0
    for path in sources():
        text = path.read_text(encoding="utf-8")
        tree_ = ast.parse(text, str(path))
        for node in calls(tree_, "torch", "load"):
            torch_loads += 1
            weights_only = [k for k in node.keywords if k.arg == "weights_only"]
            assert weights_only and isinstance(weights_only[0].value, ast.Constant) and \
                weights_only[0].value.value is True, f"{path.name}:{node.lineno}: torch.load without weights_only=True"
        for node in ast.walk(tree_):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                roots = {(n or "").split(".")[0] for n in names}
                assert not {"cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"} & roots, \
                    f"{path.name}:{node.lineno}: imports a pickle module"
                if "pickle" in roots:
                    # Allowed only to name the error torch.load(weights_only=True) raises on a refused file.
                    uses = {n.attr for n in ast.walk(tree_) if isinstance(n, ast.Attribute)
                            and isinstance(n.value, ast.Name) and n.value.id == "pickle"}
                    assert isinstance(node, ast.Import) and uses == {"UnpicklingError"}, \
                        f"{path.name}:{node.lineno}: uses pickle for more than its error type: {uses}"
            if isinstance(node, ast.keyword) and isinstance(node.value, ast.Constant):
                assert not (node.arg == "trust_remote_code" and node.value.value is True), \
                    f"{path.name}:{node.lineno}: trust_remote_code=True"
                assert not (node.arg == "weights_only" and node.value.value is False), \
                    f"{path.name}:{node.lineno}: weights_only=False"
        assert "pickle.load" not in text and "trust_remote_code=True" not in text, path
    assert torch_loads >= 1, "the checkpoint loader was found"


# ---- trust_remote_code -----------------------------------------------------------------------------
def test_trust_remote_code_is_off_by_default_everywhere():
    assert TrainingParameters().trust_remote_code is False
    assert TrainingParameters.from_dict({"lora_name": "x"}).trust_remote_code is False
    from trainer.cli import build_parser

    args = build_parser().parse_args(["preview", "--raw-text-file", "x.txt"])
    assert not args.trust_remote_code


def test_a_model_with_its_own_code_is_not_run_without_the_tick(home, tmp_path):
    folder = home / "models" / "custom-code"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(
        '{"model_type": "custom", "architectures": ["CustomForCausalLM"], "auto_map": '
        '{"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomForCausalLM"}}')
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "CustomTokenizer", "auto_map": {"AutoTokenizer": ["custom.CustomTokenizer", null]}}')
    (folder / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    (folder / "model.safetensors").write_bytes(b"")
    from trainer.models import load_model, load_tokenizer

    with pytest.raises(DashboardError, match="Cannot load the tokenizer of custom-code"):
        load_tokenizer("custom-code")
    with pytest.raises(DashboardError, match="Cannot load the model custom-code"):
        load_model("custom-code")
    assert not marker.exists()


def test_the_train_page_warns_when_trust_remote_code_is_ticked(home):
    at = AppTest.from_file(TRAIN_PAGE, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    assert at.checkbox(key="tp_trust_remote_code").value is False
    assert not [w for w in at.warning if "Trust remote code" in w.value]
    at.checkbox(key="tp_trust_remote_code").check().run()
    assert not at.exception, at.exception
    assert [w for w in at.warning if "Trust remote code runs Python code" in w.value]
