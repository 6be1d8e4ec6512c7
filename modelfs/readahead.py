"""Start-up readahead: the files a mount is about to import, asked of the
disk all at once.

A mount imports some 500 compiled modules (modelfs, trio, pyfuse3,
botocore and the standard library's share of them) and parses botocore's
S3 model. After a boot none of them is in the page cache, and the import
system reads them one after another, each read a wait on the disk: 0.15 s
of a 0.6 s start-up here. This module owns one short-lived process, forked
by the console script before it imports the command line, that opens those
files and hands each to the kernel's readahead (``POSIX_FADV_WILLNEED``,
which queues the reads and returns), so the disk works on all of them
while the mount imports the first ones, on the other core.

What it reads is a fixed list: third-party packages whole (their compiled
modules and extensions), the standard library's modules by name, and
S3's files in botocore's data. A module missing from the list is read when
imported, as it would be anyway; a file in the list that is not there is
skipped. Nothing here can change what is imported or read, only when the
disk reads it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

# Packages a mount imports, read whole (compiled modules, extensions), or
# single modules.
PACKAGES = (
    "modelfs", "trio", "pyfuse3", "lmdb", "cachetools", "xxhash", "attr", "attrs",
    "outcome", "sniffio", "sortedcontainers", "idna", "boto3", "botocore",
    "s3transfer", "urllib3", "dateutil", "jmespath", "certifi", "six",
)  # fmt: skip
# The standard library's modules a mount imports; a package, whole.
STDLIB = (
    "__future__", "_compat_pickle", "_compression", "_markupbase", "_weakrefset",
    "argparse", "ast", "base64", "bisect", "bz2", "calendar", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "csv", "dataclasses",
    "datetime", "decimal", "dis", "enum", "fnmatch", "functools", "getpass",
    "gettext", "gzip", "hashlib", "heapq", "hmac", "inspect", "ipaddress",
    "keyword", "linecache", "locale", "lzma", "mimetypes", "numbers", "opcode",
    "operator", "pathlib", "pickle", "platform", "queue", "quopri", "random",
    "reprlib", "secrets", "selectors", "shlex", "shutil", "signal", "socket",
    "ssl", "string", "stringprep", "struct", "subprocess", "tempfile",
    "textwrap", "threading", "token", "tokenize", "traceback", "types",
    "typing", "uuid", "warnings", "weakref", "zipfile", "collections",
    "concurrent", "ctypes", "email", "html", "http", "importlib", "json",
    "logging", "multiprocessing", "re", "urllib", "xml/__init__", "xml/etree",
    "encodings/idna",
)  # fmt: skip
# botocore's data a mount loads: the endpoints tables and S3's model.
BOTOCORE_DATA = ("endpoints.json", "partitions.json", "sdk-default-configuration.json", "s3")
# Directories of a package no mount imports from.
_SKIP = frozenset({"tests", "_tests", "testing", "__pycache__", "data"})

_started = False


def wanted(argv: list[str]) -> bool:
    """Whether `modelfs ARGV` mounts: ``mount ...``, or the fstab form
    (``SOURCE MNT -o ...``), which starts with neither a command nor an
    option."""
    other = {"umount", "pull", "warm", "snapshot", "stats", "cache", "help"}
    return bool(argv) and argv[0] not in other and not argv[0].startswith("-")


def start() -> None:
    """Start the reader (once): a process of its own, orphaned at once.

    Not a thread: a thread that makes a system call per file gets the GIL
    back only when the importing main thread lets go of it (every 5 ms), so
    it reached a few dozen files before the mount was done (60 ms saved
    instead of 100, and 25 ms lost with a warm page cache). The reader is
    forked twice, so that init reaps it and no caller waits on it; it
    holds none of the caller's descriptors, so a caller reading the
    mount's output until EOF does not wait on it either."""
    global _started
    if _started:
        return
    _started = True
    try:
        pid = os.fork()
    except OSError:
        return
    if pid == 0:
        try:
            if os.fork() == 0:
                _detach()
                _advise_all()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _detach() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, 1 << 20)


def files() -> Iterator[str]:
    """Every file the readahead asks for, that exists."""
    tag = sys.implementation.cache_tag
    here = os.path.dirname(os.path.abspath(__file__))
    roots = [os.path.dirname(here), *(p for p in sys.path if p and os.path.isdir(p))]
    for name in PACKAGES:
        for root in roots:
            top = os.path.join(root, name)
            if os.path.isdir(top):
                yield from _package(top, tag)
                if name == "botocore":
                    yield from _botocore_data(os.path.join(top, "data"))
                break
            module = _compiled(root, name, tag)
            if module:
                yield module
                break
    stdlib = os.path.dirname(os.__file__)
    for name in STDLIB:
        path = os.path.join(stdlib, name)
        if os.path.isdir(path):
            yield from _package(path, tag)
        elif module := _compiled(stdlib, name, tag):
            yield module


def _compiled(root: str, name: str, tag: str) -> str | None:
    """The compiled file of module `name` (a path under `root`), if any."""
    folder, base = os.path.split(os.path.join(root, name))
    path = os.path.join(folder, "__pycache__", f"{base}.{tag}.pyc")
    return path if os.path.isfile(path) else None


def _package(top: str, tag: str) -> Iterator[str]:
    suffix = f".{tag}.pyc"
    for folder, dirs, names in os.walk(top):
        dirs[:] = [d for d in dirs if d not in _SKIP]
        cache = os.path.join(folder, "__pycache__")
        if os.path.isdir(cache):
            yield from (os.path.join(cache, n) for n in os.listdir(cache) if n.endswith(suffix))
        yield from (os.path.join(folder, n) for n in names if n.endswith(".so"))


def _botocore_data(data: str) -> Iterator[str]:
    for name in BOTOCORE_DATA:
        path = os.path.join(data, name)
        if os.path.isfile(path):
            yield path
        elif os.path.isdir(path):
            for folder, _dirs, names in os.walk(path):
                yield from (os.path.join(folder, n) for n in names)


def _advise_all() -> None:
    for path in files():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
