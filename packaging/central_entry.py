"""PyInstaller entry point of the storelink-central single binary."""

from __future__ import annotations

from central.cli import main

if __name__ == "__main__":
    main()
