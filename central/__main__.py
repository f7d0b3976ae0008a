"""``python -m central`` is ``storelink-central``."""

from central.cli import main

main()
