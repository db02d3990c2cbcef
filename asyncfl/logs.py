"""One logger for the project ("asyncfl"), printing progress lines through Flower's output."""

from __future__ import annotations

import logging

_DONE = False


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    global _DONE
    log = logging.getLogger("asyncfl")
    if not _DONE:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False
        _DONE = True
    return log
