"""Where the commands and the daemon log: stderr, the journal, or a log
file that survives logrotate and cannot fill the disk with --debug."""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..humane import HumaneFormatter


def journal_stderr() -> bool:
    """True when stderr is systemd's journal stream (systemd sets
    $JOURNAL_STREAM to its device:inode); journald then adds time and pid."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


# With --debug (a line per GET) the log file is rolled over to FILE.1 at
# this size, so it cannot fill the disk when nobody rotates it.
DEBUG_LOG_CAP = 256 << 20


class LogFile(logging.handlers.WatchedFileHandler):
    """The daemon's log file: reopened when logrotate (or anyone) moves or
    deletes it, created owner-only (it names keys and byte ranges), and,
    given a `cap`, rolled over to ``FILE.1`` when it grows past it."""

    def __init__(self, path: Path, cap: int | None = None, *, follow: bool = True) -> None:
        self.cap = cap
        self.flags = _log_flags(follow)
        super().__init__(path, delay=False)

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, self.flags, 0o600)
        return open(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if self.cap is not None and self.stream is not None and self.stream.tell() > self.cap:
            try:
                self.stream.close()
                os.replace(self.baseFilename, self.baseFilename + ".1")
            except OSError:
                pass
            self.stream = self._open()
            self._statstream()


def _log_flags(follow: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    return flags if follow else flags | os.O_NOFOLLOW


def _create_log_file(path: Path, follow: bool) -> None:
    """The log file, owner-only (it names keys and ranges), with the
    directories above it; a ConfigError naming the path if it cannot be.
    Without `follow` (the default log inside the cache directory) a link in
    its place is refused: it would make the daemon append to its target."""
    try:
        for above in (path.parent, *path.parent.parents):
            if os.path.lexists(above):
                if not above.is_dir():
                    raise ConfigError(
                        f"cannot write the log file {path}: {above} is not a directory"
                    )
                break
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, _log_flags(follow), 0o600))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"cannot write the log file {path}: it is a symbolic link, and modelfs "
                "never writes through a link inside its cache directory"
            ) from None
        raise ConfigError(f"cannot write the log file {path}: {exc.strerror or exc}") from None


def setup_logging(debug: bool, path: Path | None = None, *, follow: bool = True) -> None:
    """Log to `path`, or to stderr (shorter lines when it is the journal).
    `follow`: whether `path` may be a symbolic link (a --log-file the user
    named may; the default one inside the cache directory may not)."""
    handler: logging.Handler
    fmt = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    if path is not None:
        _create_log_file(path, follow)
        handler = LogFile(path, cap=DEBUG_LOG_CAP if debug else None, follow=follow)
    else:
        handler = logging.StreamHandler(sys.stderr)
        if journal_stderr():
            fmt = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(HumaneFormatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Never below WARNING, even with --debug: botocore's debug output
    # carries request headers (signatures, session tokens).
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
