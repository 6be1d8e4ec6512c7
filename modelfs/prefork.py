"""The daemon, forked ahead: ``modelfs mount`` forks the process that will
serve the mount as its first step, before it imports the command line.

A mount's start-up is mostly imports, in two halves that do not depend on
each other: the command line (argparse, the options, the sources, the
checks of the mount point and the cache) in the ``modelfs mount`` process,
and the daemon's (trio, pyfuse3, the cache, boto3 and botocore) in the
process it forks. Forked only once the arguments were checked, the daemon
imported its half after the command line had done its own, one after the
other. Forked first, it imports its half on the other core while the
command line checks the arguments, then waits for the configuration on a
pipe. ``modelfs mount`` hands it over (`hand_over`) where it would have
forked; when it does not mount (an error, ``--foreground``), the seed,
which has done nothing but import, is killed and reaped before ``modelfs
mount`` goes on or exits.

Nothing here decides anything about the mount: a seed that failed to start
or to import is simply not used, and the daemon is forked the old way.
"""

from __future__ import annotations

import atexit
import os
import pickle
import signal
from collections.abc import Callable
from typing import Any


class _Seed:
    def __init__(self, pid: int, config_w: int, ready_r: int) -> None:
        self.pid, self.config_w, self.ready_r = pid, config_w, ready_r


_seed: _Seed | None = None


def wanted(argv: list[str]) -> bool:
    """Whether to fork ahead for `modelfs ARGV` (a mount, not in the
    foreground: a foreground mount serves from this very process)."""
    return not any("foreground" in a or (a[:1] == "-" and a[1:2] != "-" and "f" in a) for a in argv)


# What the seed runs once it has its configuration: the daemon's part of
# `daemonize` (given by the caller, which may import the command line).
Child = Callable[[Any, int, Any], int]


def start(child: Child) -> None:
    """Fork the seed (once); it serves through `child(cfg, ready_fd, snapshot)`."""
    global _seed
    if _seed is not None:
        return
    config_r, config_w = os.pipe()
    ready_r, ready_w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        for fd in (config_r, config_w, ready_r, ready_w):
            os.close(fd)
        return
    if pid == 0:
        rc = 1
        try:  # whatever happens, the seed never returns into the command line
            os.close(config_w)
            os.close(ready_r)
            rc = _grow(config_r, ready_w, child)
        finally:
            os._exit(rc)
    os.close(config_r)
    os.close(ready_w)
    _seed = _Seed(pid, config_w, ready_r)
    atexit.register(discard)


def hand_over(cfg: Any, snapshot: Any) -> tuple[int, int] | None:
    """Give the seed its configuration: its pid and the read end of its
    readiness pipe, or None when there is no seed to give it to (then the
    caller forks the daemon itself)."""
    global _seed
    seed, _seed = _seed, None
    if seed is None:
        return None
    try:
        data = memoryview(pickle.dumps((cfg, snapshot)))
        while data:
            data = data[os.write(seed.config_w, data) :]
    except OSError:  # the seed died (a failed import): fork the old way
        os.close(seed.config_w)
        os.close(seed.ready_r)
        _reap(seed.pid)
        return None
    os.close(seed.config_w)
    return seed.pid, seed.ready_r


def discard() -> None:
    """No mount for the seed: end it, and reap it."""
    global _seed
    seed, _seed = _seed, None
    if seed is not None:
        os.close(seed.config_w)
        os.close(seed.ready_r)
        # It has only imported modules: nothing to finish, and an error
        # should not wait for its imports.
        try:
            os.kill(seed.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _reap(seed.pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _grow(config_r: int, ready_w: int, child: Child) -> int:
    """The seed: import the daemon's half, wait for the configuration, serve."""
    try:
        import boto3  # noqa: F401  (the daemon's S3 client, its largest import)

        from . import daemon  # noqa: F401
    except BaseException:
        return 1
    chunks = []
    while chunk := os.read(config_r, 1 << 16):
        chunks.append(chunk)
    os.close(config_r)
    if not chunks:
        return 0
    cfg, snapshot = pickle.loads(b"".join(chunks))
    return child(cfg, ready_w, snapshot)
