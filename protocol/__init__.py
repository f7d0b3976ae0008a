"""storelink's wire contract: events, records, batches, subjects. No I/O, no asyncio."""

from __future__ import annotations

__version__ = "0.1.0"
