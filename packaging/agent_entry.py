"""PyInstaller entry point of the storelink-agent single binary."""

from __future__ import annotations

from agent.cli import main

if __name__ == "__main__":
    main()
