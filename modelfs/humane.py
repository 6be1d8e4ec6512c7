"""Text from the outside world made safe to show a human: keys and URLs.

Owns two rules, applied where text leaves modelfs (the log formatter, the
CLI's error line, ``modelfs cache ls``):

* control characters are escaped (``\\n`` becomes the two characters ``\\n``),
  so a key holding ``\\n... ERROR ...`` cannot forge a log line;
* the user-info part of a URL (``http://user:secret@host``) is replaced by
  ``***``, so an endpoint given with credentials never reaches a log or a
  terminal.
"""

from __future__ import annotations

import logging
import re

_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")


def escape(text: str) -> str:
    """`text` with every non-printable character written as a Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def redact(text: str) -> str:
    """`text` with credentials inside URLs replaced by ***."""
    return _USERINFO.sub(r"\1***@", text)


def for_humans(text: str) -> str:
    return escape(redact(text))


class HumaneFormatter(logging.Formatter):
    """Escapes and redacts each record's message (not the traceback lines
    appended after it, which are ours)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        record.message = for_humans(record.message)
        return super().formatMessage(record)
