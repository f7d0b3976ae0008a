"""The HQ dashboard, served by central's HTTP server at ``/``: every store worst first, a page
per store, the actions an operator may take with a token. ``routes.py`` answers the requests,
``pages.py`` writes the HTML, ``static/`` holds the stylesheet and the refresh script."""

from __future__ import annotations

from central.dashboard.routes import Backend, Dashboard

__all__ = ["Backend", "Dashboard"]
