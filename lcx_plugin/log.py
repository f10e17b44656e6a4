"""The "lcx" logger: one handler, set up once per process, level from $LCX_LOG_LEVEL (INFO)."""
from __future__ import annotations

import logging
import os
import sys


def get_logger() -> logging.Logger:
    logger = logging.getLogger("lcx")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s lcx: %(message)s", "%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("LCX_LOG_LEVEL", "INFO").upper())
        logger.propagate = False
    return logger
