"""Logging set-up (called once by the CLI) and redaction of personal data and secrets.

Emails, phone numbers, digit runs that could be codes, API keys and webhook secrets are masked
by one filter on every handler, so a careless ``logger.info`` cannot leak them.
"""

from __future__ import annotations

import logging
import re
import sys

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"whsec_[A-Za-z0-9+/=]+"), "whsec_***"),
    (re.compile(r"\bhk_[A-Za-z0-9]+_[A-Za-z0-9_-]+"), "hk_***"),
    (
        re.compile(
            r"(?i)\b(bearer|authorization|api[_-]?key|secret|password|token)([\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+"
        ),
        r"\1\2***",
    ),
    (re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,255}\.[A-Za-z]{2,24}"), "***@***"),
    # Phone numbers: digits with spaces, brackets or dashes (dots would eat IP addresses); not
    # the fraction of a decimal ("succeeded in 0.0123456s" keeps its duration).
    (re.compile(r"(?<![\d.])\+?\d[\d ()-]{6,}\d"), "***"),
    # Any other run of 4+ digits could be a code; ports, pids and dotted numbers are left alone.
    (re.compile(r"(?<![\w:.])(?<!pid )\d{4,}(?![\w.])"), "***"),
]


def number(n: int) -> str:
    """``n`` with thousands separators (``100,000``), for counts in log messages.

    The filter masks every bare run of four or more digits as a possible code, so a log line
    saying ``100000 lines`` would reach the operator as ``*** lines``. With separators no run is
    longer than three digits, and the number reads better too.
    """
    return f"{n:,}"


def redact(text: str, *, limit: int | None = None) -> str:
    """``text`` with secrets and personal data masked, cut to ``limit`` characters."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


class RedactingFilter(logging.Filter):
    """Masks the rendered message (and exception text) of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def configure(level: str = "INFO") -> None:
    """Install one stderr handler with the redacting filter on the root logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
