"""modelfs.readahead: the files a mount is about to import, read ahead by a
process of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelfs import readahead


@pytest.mark.parametrize(
    ("argv", "mounts"),
    [
        (["mount", "s3://b", "/mnt"], True),
        (["s3://b", "/mnt", "-o", "ro"], True),  # the fstab form
        (["umount", "/mnt"], False),
        (["stats", "/mnt"], False),
        (["--version"], False),
        ([], False),
    ],
)
def test_only_a_mount_reads_ahead(argv: list[str], mounts: bool) -> None:
    assert readahead.wanted(argv) is mounts


# What a mount imports and loads before its first GET, in a fresh interpreter.
_MOUNT_IMPORTS = """
import json, os, sys
import botocore.loaders
loaded = []
real = botocore.loaders.JSONFileLoader.load_file
import modelfs.cli.sources, modelfs.cli.mount, modelfs.daemon, modelfs.fs
from modelfs.s3 import client as c
from modelfs.s3.settings import S3Settings
s = S3Settings(endpoint_url="http://127.0.0.1:9", region="us-east-1", profile=None,
               credentials_file=None, addressing_style="path", unsigned=False,
               connect_timeout=1.0, read_timeout=1.0, retry_timeout=1.0, pool=4)
session = c.session(s)
data = session._session.get_component("data_loader")
real = data.file_loader.load_file
def record(path):
    found = real(path)
    if found is not None:
        found_at = [path + e for e in (".json", ".json.gz") if os.path.exists(path + e)]
        loaded.append(found_at[0])
    return found
data.file_loader.load_file = record
c.client(session, s, retries={"total_max_attempts": 1})
files = [m.__cached__ for m in list(sys.modules.values())
         if getattr(m, "__cached__", None) and os.path.exists(m.__cached__)]
print(json.dumps({"modules": files, "data": loaded}))
"""


def test_the_list_covers_what_a_mount_imports_and_loads() -> None:
    """The fixed list stays true to the code: nearly every compiled module
    a mount imports (the few left are read when imported, as before), and
    every botocore file it loads."""
    out = subprocess.run(
        [sys.executable, "-c", _MOUNT_IMPORTS], capture_output=True, text=True, check=True
    )
    used = json.loads(out.stdout)
    listed = {os.path.realpath(f) for f in readahead.files()}
    modules = [os.path.realpath(f) for f in used["modules"]]
    missing = [f for f in modules if f not in listed]
    assert len(modules) > 300
    assert len(missing) <= 0.05 * len(modules), missing
    assert used["data"] and all(os.path.realpath(f) in listed for f in used["data"]), used["data"]


def test_every_listed_file_is_handed_to_the_kernel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    names = [tmp_path / f"m{i}.pyc" for i in range(3)]
    for p in names:
        p.write_bytes(b"x" * 10000)
    advised: list[int] = []
    monkeypatch.setattr(
        readahead, "files", lambda: iter([*map(str, names), str(tmp_path / "gone")])
    )
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: advised.append(advice))
    readahead._advise_all()
    assert advised == [os.POSIX_FADV_WILLNEED] * 3


_SLOW_READER = """
import os, sys, time
from modelfs import readahead
def slow():
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
readahead._advise_all = slow
readahead.start()
readahead.start()  # once only
print("mounting")
"""


def test_the_reader_is_orphaned_and_holds_none_of_the_callers_descriptors(tmp_path: Path) -> None:
    """A caller that reads the mount's output until EOF (as `subprocess.run`
    does) and waits for it gets both at once, however long the reader runs;
    the reader is not the caller's child, so nothing is left to reap."""
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_READER, str(pidfile)], stdout=subprocess.PIPE, text=True
    )
    try:
        out, _ = proc.communicate(timeout=20)  # the reader sleeps 60 s
        assert out == "mounting\n" and proc.returncode == 0
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[1]) not in (proc.pid, os.getpid())  # its parent
        assert sorted(os.listdir(f"/proc/{pid}/fd")) == ["0", "1", "2"]
        assert os.readlink(f"/proc/{pid}/fd/1") == os.devnull
    finally:
        proc.kill()
        if pidfile.exists() and pidfile.read_text():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
