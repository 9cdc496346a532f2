"""Which tritonserver the launcher runs: $TRITONSERVER, the NGC container's, the pytriton wheel's,
then one on PATH (a system install, e.g. a container without the wheel)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llmserve.triton import launcher


def _fake_server(root: Path) -> Path:
    binary = root / "bin" / "tritonserver"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (root / "backends").mkdir()
    return binary


@pytest.fixture
def no_system_server(monkeypatch, tmp_path):
    """No $TRITONSERVER, no NGC install, nothing on PATH."""
    monkeypatch.delenv("TRITONSERVER", raising=False)
    monkeypatch.delenv("TRITON_BACKEND_DIR", raising=False)
    monkeypatch.setattr(launcher, "NGC_TRITONSERVER", tmp_path / "absent" / "bin" / "tritonserver")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))


def test_explicit_env_wins_over_everything(no_system_server, monkeypatch, tmp_path):
    explicit = _fake_server(tmp_path / "explicit")
    monkeypatch.setattr(launcher, "NGC_TRITONSERVER", _fake_server(tmp_path / "ngc"))
    monkeypatch.setenv("TRITONSERVER", str(explicit))
    install = launcher.find_tritonserver()
    assert install.binary == explicit
    assert install.backend_dir == tmp_path / "explicit" / "backends"


def test_explicit_env_naming_no_file_is_an_error(no_system_server, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITONSERVER", str(tmp_path / "nope" / "tritonserver"))
    with pytest.raises(FileNotFoundError, match="TRITONSERVER=.*is not a file"):
        launcher.find_tritonserver()


def test_ngc_install_comes_before_the_wheel(no_system_server, monkeypatch, tmp_path):
    ngc = _fake_server(tmp_path / "ngc")
    monkeypatch.setattr(launcher, "NGC_TRITONSERVER", ngc)
    install = launcher.find_tritonserver()
    assert (install.binary, install.backend_dir) == (ngc, tmp_path / "ngc" / "backends")


def test_wheel_comes_before_path(no_system_server, monkeypatch, tmp_path):
    pytest.importorskip("pytriton", reason="the nvidia-pytriton wheel is not installed")
    on_path = _fake_server(tmp_path / "system")
    monkeypatch.setenv("PATH", str(on_path.parent))
    install = launcher.find_tritonserver()
    assert "pytriton" in install.binary.parts
    assert install.binary.is_file()


def test_path_is_used_when_the_wheel_is_absent(no_system_server, monkeypatch, tmp_path):
    on_path = _fake_server(tmp_path / "system")
    monkeypatch.setenv("PATH", str(on_path.parent))
    monkeypatch.setitem(sys.modules, "pytriton", None)  # `import pytriton` raises ImportError
    install = launcher.find_tritonserver()
    assert (install.binary, install.backend_dir) == (on_path, tmp_path / "system" / "backends")


def test_backend_dir_override_for_a_system_install(no_system_server, monkeypatch, tmp_path):
    on_path = _fake_server(tmp_path / "system")
    monkeypatch.setenv("PATH", str(on_path.parent))
    monkeypatch.setenv("TRITON_BACKEND_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setitem(sys.modules, "pytriton", None)
    assert launcher.find_tritonserver().backend_dir == tmp_path / "elsewhere"


def test_nothing_found_says_what_to_do(no_system_server, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytriton", None)
    with pytest.raises(FileNotFoundError, match="no tritonserver found.*make install.*TRITONSERVER"):
        launcher.find_tritonserver()
