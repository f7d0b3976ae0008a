"""The import rules of docs/architecture.md ("Where things live"), checked on every module.

Every import counts, a lazy one inside a function as much as one at the top of a file: a rule
that held only for top-level imports would not say where a concern lives.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "agent", "central")

# protocol/ opens no sockets, files of its own or databases and runs no event loop: these are
# the modules that would let it.
IO_MODULES = frozenset(
    {"asyncio", "socket", "sqlite3", "aiosqlite", "aiohttp", "nats", "uvloop", "subprocess"}
)
# What central may take from agent: writing an agent's config (`stores add`, the demo) and the
# demo's simulated till.
CENTRAL_MAY_IMPORT_FROM_AGENT = frozenset({"agent.config", "agent.simulator"})


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    return _imports_in(path.read_text(), package)


def _imports_in(source: str, package: str) -> list[str]:
    """Every module ``source`` (a module of ``package``) imports."""
    tree = ast.parse(source)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append(module)
            # `from central import dlq` imports the module central.dlq.
            found.extend(f"{module}.{alias.name}" for alias in node.names)
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".")[0]


def _violations(package: str, allowed: object) -> list[str]:
    assert callable(allowed)
    bad = []
    for path in _modules(package):
        for name in _imports(path):
            if not allowed(name):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return sorted(set(bad))


def test_protocol_imports_neither_side_nor_io() -> None:
    """protocol/ imports neither agent/ nor central/, nor any module that does I/O."""

    def allowed(name: str) -> bool:
        return _top(name) not in {"agent", "central"} | IO_MODULES

    assert [] == _violations("protocol", allowed)


def test_agent_never_imports_central() -> None:
    """agent/ (the store's binary) never imports central/."""
    assert [] == _violations("agent", lambda name: _top(name) != "central")


def test_central_imports_from_agent_only_what_provisions_or_simulates_one() -> None:
    """central/ takes from agent/ only agent.config (provisioning) and agent.simulator (the
    demo's till)."""

    def allowed(name: str) -> bool:
        if _top(name) != "agent":
            return True
        return (
            any(name == ok or name.startswith(ok + ".") for ok in CENTRAL_MAY_IMPORT_FROM_AGENT)
            or name == "agent"
        )

    assert [] == _violations("central", allowed)


def test_the_checker_sees_lazy_and_relative_imports() -> None:
    """An import inside a function, a `from package import module` and a relative import
    are all seen (else the rules above would prove little)."""
    source = "def f():\n    from central import dlq\n    from .sinks import file\n"
    found = _imports_in(source, "central")
    assert {"central.dlq", "central.sinks.file"} <= set(found)


def test_every_module_is_on_the_map() -> None:
    """docs/architecture.md's "Where things live" names every module of the three packages."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    missing = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in _modules(package)
        if path.name not in {"__init__.py", "__main__.py"}
        and f"`{path.relative_to(ROOT)}`" not in section
    ]
    assert [] == missing
