"""modelfs.prefork: the daemon forked ahead of the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from modelfs import prefork


@pytest.mark.parametrize(
    ("argv", "ahead"),
    [
        (["mount", "s3://b", "/mnt"], True),
        (["s3://b", "/mnt", "-o", "ro,allow_other"], True),
        (["mount", "s3://b", "/mnt", "--foreground"], False),
        (["mount", "s3://b", "/mnt", "-f"], False),
        (["mount", "s3://b", "/mnt", "-df"], False),
        (["s3://b", "/mnt", "-o", "ro,foreground"], False),
    ],
)
def test_a_foreground_mount_forks_nothing_ahead(argv: list[str], ahead: bool) -> None:
    assert prefork.wanted(argv) is ahead


_HAND_OVER = """
import json, os, sys
from modelfs import prefork

def child(cfg, ready_w, snapshot):  # the seed serves: here, says what it got
    os.write(ready_w, json.dumps({"pid": os.getpid(), "cfg": cfg, "snap": snapshot}).encode())
    return 0

prefork.start(child)
pid, ready_r = prefork.hand_over({"mountpoint": "/mnt/x"}, ["pinned"])
got = json.loads(os.read(ready_r, 4096))
assert os.waitpid(pid, 0)[1] == 0
print(json.dumps({"handed": pid, **got}))
"""


def test_the_configuration_reaches_the_seed_which_serves_it() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _HAND_OVER], capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout)
    assert got["pid"] == got["handed"]  # the seed is the daemon
    assert got["cfg"] == {"mountpoint": "/mnt/x"} and got["snap"] == ["pinned"]


def test_no_hand_over_without_a_seed() -> None:
    assert prefork.hand_over({}, None) is None  # the caller forks the old way


def test_a_mount_that_fails_leaves_no_seed_behind(tmp_path: Path) -> None:
    """`modelfs mount` that does not mount (here: no such mount point)
    ends its seed and reaps it before it exits: no process is left with
    its command line. The seed is made slow to import (a boto3 that
    sleeps 2 s), so one not waited for would still be there."""
    tag = uuid.uuid4().hex
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "boto3.py").write_text("import time\ntime.sleep(2)\n")
    err = tmp_path / "stderr"
    with open(err, "w") as errf:  # a file, not a pipe: no wait for its EOF
        proc = subprocess.run(
            [sys.executable, "-m", "modelfs", "mount", "s3://bucket", str(tmp_path / tag),
             "--endpoint-url", "http://127.0.0.1:9", "--cache-dir", str(tmp_path / "c")],
            stdout=subprocess.DEVNULL, stderr=errf, timeout=60,
            env={**os.environ, "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
                 "PYTHONPATH": str(slow)},
        )  # fmt: skip
    assert proc.returncode != 0 and err.read_text().count("\n") == 1, err.read_text()
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if tag.encode() in cmdline:
            left.append(int(pid))
    for pid in left:
        os.kill(pid, 9)
    assert left == []
