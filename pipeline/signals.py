"""Process signals shared by the command-line entry points."""

from __future__ import annotations

import signal


def stop_on_sigterm() -> None:
    """SIGTERM (a supervisor, a CI timeout, `kill`) and SIGHUP (the terminal closed) stop like Ctrl-C,
    so the same cleanup runs."""

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
