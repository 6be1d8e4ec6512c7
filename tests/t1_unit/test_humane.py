"""Keys and URLs reach people escaped and redacted (`modelfs.humane`); the
mounted side (a key forging a log line) is in tests/t4_hostile/test_low.py."""

from __future__ import annotations

from modelfs.humane import escape, for_humans, redact


def test_escape_and_redact() -> None:
    assert escape("models/ok-файл.bin") == "models/ok-файл.bin"
    assert escape("a\nb\x1b[31m\u2028") == "a\\nb\\x1b[31m\\u2028"
    assert redact("http://user:secret@host:9000/b") == "http://***@host:9000/b"
    assert redact("see s3://b/k and https://host/x") == "see s3://b/k and https://host/x"
    assert for_humans("http://u:p@h/\n") == "http://***@h/\\n"
