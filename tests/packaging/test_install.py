"""packaging/install-agent.sh, run for real into a temporary root.

The script is bash; the binary it installs is the real agent CLI (a two-line wrapper around
``python -m agent``); the config is what ``storelink-central stores add`` wrote. Only the
system's own tools are stood in for: ``useradd``, ``chown`` and ``getent`` record or answer,
and ``systemctl`` records and, on ``restart``, starts the installed unit's ExecStart and waits
for /healthz as Type=notify would.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import config_from_dict, render_config
from central.broker import free_port

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "packaging" / "install-agent.sh"
UNIT = "storelink-agent.service"
PREFIX = "/opt/storelink"
WAIT = 30.0  # bounds waits that end in about a second

SYSTEMCTL = '''#!{python}
"""systemctl stand-in: records the call; restart runs the unit's ExecStart under DESTDIR."""
import os, subprocess, sys, time, tomllib, urllib.request
from pathlib import Path

destdir, calls = {destdir!r}, Path({calls!r})
with calls.open("a") as log:
    log.write(" ".join(["systemctl", *sys.argv[1:]]) + "\\n")
if sys.argv[1:] == ["restart", "storelink-agent.service"]:
    unit = Path(destdir + "/etc/systemd/system/storelink-agent.service").read_text()
    (line,) = [l for l in unit.splitlines() if l.startswith("ExecStart=")]
    argv = [destdir + a if a.startswith("/") else a for a in line[10:].split()]
    config = tomllib.loads(Path(argv[-1]).read_text())
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open({agent_log!r}, "ab"))
    Path({pid_file!r}).write_text(str(proc.pid))
    url = "http://" + config["ingest"]["listen"] + "/healthz"
    deadline = time.monotonic() + {wait}
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            sys.exit(0)
        except OSError:
            time.sleep(0.05)
    sys.exit(1)
'''


@dataclass
class Store:
    """Everything one install run needs: the inputs and where to look afterwards."""

    tmp: Path
    config: Path
    binary: Path
    destdir: Path
    calls: Path
    pid_file: Path
    bin_dir: Path

    def env(self, *, user_exists: bool) -> dict[str, str]:
        getent = self.bin_dir / ("getent-yes" if user_exists else "getent-no")
        return {
            **os.environ,
            "DESTDIR": str(self.destdir),
            "PREFIX": PREFIX,
            "SYSTEMCTL": str(self.bin_dir / "systemctl"),
            "USERADD": str(self.bin_dir / "useradd"),
            "CHOWN": str(self.bin_dir / "chown"),
            "GETENT": str(getent),
            "RUNAS": "",
        }

    def install(self, *args: str, user_exists: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=self.env(user_exists=user_exists),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def recorded(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def installed(self, path: str) -> Path:
        return self.destdir / path.lstrip("/")


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def stop_started_agent(pid_file: Path) -> None:
    """SIGTERM the agent the systemctl stand-in started, and wait until it has exited."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + WAIT
    status = Path(f"/proc/{pid}/status")
    # Not our child (the stand-in exited), so no waitpid: gone or a zombie means it has exited.
    while time.monotonic() < deadline:
        try:
            if "State:\tZ" in status.read_text():
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """Store S7 provisioned by ``stores add``, its data_dir and port moved into tmp_path."""
    out = tmp_path / "provisioned"
    subprocess.run(
        [sys.executable, "-m", "central", "stores", "add", "S7", "--data-dir",
         str(tmp_path / "central"), "--out", str(out), "--nats-url", "nats://127.0.0.1:1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    config = out / "agent.toml"
    data = tomllib.loads(config.read_text())
    data["data_dir"] = str(tmp_path / "agent-data")
    data["ingest"]["listen"] = f"127.0.0.1:{free_port()}"
    config.write_text(render_config(config_from_dict(data, base_dir=out)))

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    destdir = tmp_path / "root"
    pid_file = tmp_path / "agent.pid"
    for tool in ("useradd", "chown"):
        executable(bin_dir / tool, f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n')
    executable(bin_dir / "getent-yes", "#!/bin/sh\nexit 0\n")
    executable(bin_dir / "getent-no", "#!/bin/sh\nexit 2\n")
    systemctl = SYSTEMCTL.format(
        python=sys.executable,
        destdir=str(destdir),
        calls=str(calls),
        pid_file=str(pid_file),
        agent_log=str(tmp_path / "agent.log"),
        wait=WAIT,
    )
    executable(bin_dir / "systemctl", systemctl)
    binary = executable(
        tmp_path / "storelink-agent", f'#!/bin/sh\nexec {sys.executable} -m agent "$@"\n'
    )
    try:
        yield Store(tmp_path, config, binary, destdir, calls, pid_file, bin_dir)
    finally:
        stop_started_agent(pid_file)


def test_dry_run_prints_the_plan_and_changes_nothing(store: Store) -> None:
    """--dry-run checks the config, prints every command it would run, and writes nothing."""
    done = store.install("--dry-run", "--binary", str(store.binary), str(store.config))
    assert 0 == done.returncode, done.stderr
    planned = [line for line in done.stdout.splitlines() if line.startswith("+ ")]
    bin_path = store.installed(f"{PREFIX}/bin/storelink-agent")
    assert f"+ mv -f {bin_path}.new {bin_path}" in planned
    assert f"+ {store.bin_dir}/systemctl restart {UNIT}" in planned
    assert any(line.startswith(f"+ {store.bin_dir}/useradd --system") for line in planned)
    assert "dry run: nothing was changed" == done.stdout.splitlines()[-1]
    assert (False, []) == (store.destdir.exists(), store.recorded())


def test_install_lays_out_the_store_and_starts_the_service(store: Store) -> None:
    """Binary, user, config (0640), unit (ExecStart at PREFIX), data-dir drop-in; the unit is
    enabled and restarted, its ExecStart really serves, check-config and status pass."""
    done = store.install("--binary", str(store.binary), str(store.config))
    assert 0 == done.returncode, done.stdout + done.stderr

    binary = store.installed(f"{PREFIX}/bin/storelink-agent")
    config = store.installed("/etc/storelink-agent/agent.toml")
    unit = store.installed(f"/etc/systemd/system/{UNIT}")
    dropin = store.installed(f"/etc/systemd/system/{UNIT}.d/paths.conf")
    assert store.binary.read_bytes() == binary.read_bytes()
    assert (0o755, 0o640) == (
        stat.S_IMODE(binary.stat().st_mode),
        stat.S_IMODE(config.stat().st_mode),
    )
    assert store.config.read_text() == config.read_text()
    exec_start = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    assert [
        f"ExecStart={PREFIX}/bin/storelink-agent run --config /etc/storelink-agent/agent.toml"
    ] == exec_start
    assert f"ReadWritePaths={store.tmp / 'agent-data'}" in dropin.read_text().splitlines()

    calls = store.recorded()
    assert [
        "systemctl daemon-reload",
        f"systemctl enable {UNIT}",
        f"systemctl restart {UNIT}",
    ] == [c for c in calls if c.startswith("systemctl")]
    assert [
        "useradd --system --user-group --home-dir /var/lib/storelink-agent --no-create-home "
        "--shell /usr/sbin/nologin --comment storelink store agent storelink-agent"
    ] == [c for c in calls if c.startswith("useradd")]
    assert f"chown root:storelink-agent {config.parent} {config}" in calls
    assert f"{config}: ok (store S7, data in {store.tmp / 'agent-data'})" in done.stdout
    assert "service       running" in done.stdout


def test_credentials_beside_the_config_are_installed_for_the_service_only(store: Store) -> None:
    """The store's NKEY seed, named relative to agent.toml as `stores add` writes it, is
    installed beside the config, root:storelink-agent 0640 (the seed is a secret)."""
    seed = store.config.parent / "store.nk"
    text = store.config.read_text().replace(f'credentials = "{seed}"', 'credentials = "store.nk"')
    assert 'credentials = "store.nk"' in text
    store.config.write_text(text)
    done = store.install("--no-start", "--binary", str(store.binary), str(store.config))
    assert 0 == done.returncode, done.stdout + done.stderr
    installed = store.installed("/etc/storelink-agent/store.nk")
    assert (seed.read_bytes(), 0o640) == (
        installed.read_bytes(),
        stat.S_IMODE(installed.stat().st_mode),
    )
    assert f"chown root:storelink-agent {installed}" in store.recorded()


def test_running_it_again_upgrades_and_keeps_a_way_back(store: Store) -> None:
    """A second run keeps the replaced binary as .previous, backs up a changed config, and
    does not create the user again."""
    first = store.install("--no-start", "--binary", str(store.binary), str(store.config))
    assert 0 == first.returncode, first.stderr
    old_binary = store.binary.read_bytes()
    executable(store.binary, store.binary.read_text() + "# a newer build\n")
    store.config.write_text(
        store.config.read_text().replace("retention_days = 7", "retention_days = 9")
    )
    second = store.install(
        "--no-start", "--binary", str(store.binary), str(store.config), user_exists=True
    )
    assert 0 == second.returncode, second.stderr

    bin_path = store.installed(f"{PREFIX}/bin/storelink-agent")
    conf_dir = store.installed("/etc/storelink-agent")
    assert (store.binary.read_bytes(), old_binary) == (
        bin_path.read_bytes(),
        Path(f"{bin_path}.previous").read_bytes(),
    )
    backups = sorted(conf_dir.glob("agent.toml.bak-*"))
    assert 1 == len(backups)
    assert "retention_days = 7" in backups[0].read_text()
    assert "retention_days = 9" in (conf_dir / "agent.toml").read_text()
    assert 1 == sum(c.startswith("useradd") for c in store.recorded())


def test_a_config_the_binary_rejects_installs_nothing(store: Store) -> None:
    """An invalid config fails the pre-flight check: exit 1, nothing written, nothing run."""
    store.config.write_text(store.config.read_text() + "\n[surprise]\nkey = 1\n")
    done = store.install("--binary", str(store.binary), str(store.config))
    assert 1 == done.returncode
    assert "nothing was installed" in done.stderr
    assert (False, []) == (store.destdir.exists(), store.recorded())


def test_no_config_argument_prints_usage(store: Store) -> None:
    """Without AGENT_TOML the script prints its usage and exits 2."""
    done = store.install("--binary", str(store.binary))
    assert 2 == done.returncode
    assert "install-agent.sh [--dry-run] [--binary PATH] [--no-start] AGENT_TOML" in done.stderr
