"""Issue 12, item 1: one place makes a fresh machine ready, and the Makefile calls it.

``tools/machine.sh`` installs what is missing (here Chromium is made to be missing by
pointing ``DMCALL_CHROMIUM`` at nothing) with apt-get when it may, and otherwise stops with
the exact command to run. apt-get itself is a recording stand-in put first on ``PATH``:
the test must not install packages on the machine it runs on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tools.stack import ROOT

SCRIPT = ROOT / "tools" / "machine.sh"


def _fake_apt(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-calls"
    fake = bin_dir / "apt-get"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    tmp_path.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "DMCALL_CHROMIUM": str(tmp_path / "no-chromium-here"),
    }
    return env, calls


def test_as_root_the_missing_browser_is_installed_with_apt_get(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test runs as root (CI and the development machines are root)")
    env, calls = _fake_apt(tmp_path)
    result = subprocess.run(
        ["bash", str(SCRIPT), "--browser"], env=env, capture_output=True, text=True, timeout=60
    )
    lines = calls.read_text().splitlines()
    assert lines[0] == "update -qq"
    assert lines[1].startswith("install -y") and lines[1].split()[-1] == "chromium"
    # the stand-in installed nothing, so the script says the browser is still not there
    assert result.returncode == 1
    assert "no-chromium-here is not there" in result.stderr


def test_without_root_it_stops_with_the_exact_command(tmp_path: Path) -> None:
    if not shutil.which("setpriv"):
        pytest.fail("setpriv (util-linux) is needed to run the script as another user")
    env, calls = _fake_apt(tmp_path)
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            "bash",
            str(SCRIPT),
            "--browser",
        ],
        env={**env, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert (
        "sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium"
        in result.stderr
    )
    assert not calls.exists()  # nothing was tried without root


def test_nothing_missing_means_nothing_installed(tmp_path: Path) -> None:
    env, calls = _fake_apt(tmp_path)
    del env["DMCALL_CHROMIUM"]
    result = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert not calls.exists()


def test_make_test_and_make_run_make_the_machine_ready_and_ci_is_make_test() -> None:
    def dry(target: str) -> list[str]:
        # as from a shell: not as a sub-make of the `make test` this may run under
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        out = subprocess.run(
            ["make", "--no-print-directory", "-n", target],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.splitlines()

    test_steps, run_steps = dry("test"), dry("run")
    assert "tools/machine.sh --browser" in test_steps[0]
    assert any("tools.test" in step for step in test_steps)
    assert "tools/machine.sh" in run_steps[0] and "--browser" not in run_steps[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    for package in ("chromium", "redis-server", "rabbitmq-server"):
        assert package not in ci  # the Makefile's job now, not CI's
