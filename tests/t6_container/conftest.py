"""Container tier: real containers of the project's image (`make image`).

`make test-container` builds the image and runs this tier; `make test` leaves
it out. Run by hand without the image, it skips, unless
MODELFS_REQUIRE_CONTAINER=1 (set by `make test-container`), which makes a
missing image or engine a failure, so CI cannot pass without running it.

Every container a test starts is removed (`rm -f`) and every shared bind
mount it made is unmounted, whatever the test's outcome.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

IMAGE = os.environ.get("MODELFS_IMAGE", "localhost/modelfs:latest")


def _unavailable(why: str) -> None:
    if os.environ.get("MODELFS_REQUIRE_CONTAINER") == "1":
        pytest.fail(f"{why} (MODELFS_REQUIRE_CONTAINER=1)")
    pytest.skip(f"{why}; build it with `make image`, run with `make test-container`")


class Engine:
    """podman (or docker) with the flags this host needs on every run."""

    def __init__(self, program: str) -> None:
        self.program = program
        self.names: list[str] = []

    def run_flags(self) -> list[str]:
        """Flags every `run` needs on this host."""
        args: list[str] = []
        if self.program == "podman" and shutil.which("runc"):
            # crun, podman's default, refuses this host's hybrid cgroup layout.
            args += ["--runtime", "runc"]
        # The engine's default ulimits are above this host's hard limits, and
        # runc may not raise nproc even to the hard limit it inherits: ask for
        # values below both (what a pod gets from a typical kubelet).
        for name, res, want in (
            ("nofile", resource.RLIMIT_NOFILE, 20000),
            ("nproc", resource.RLIMIT_NPROC, 4096),
        ):
            hard = resource.getrlimit(res)[1]
            n = want if hard == resource.RLIM_INFINITY else min(want, hard)
            args += ["--ulimit", f"{name}={n}:{n}"]
        return args

    def run(self, name: str, *args: str) -> str:
        """Start a detached container; it is removed at teardown."""
        self.names.append(name)
        out = self.call("run", *self.run_flags(), "-d", "--name", name, *args)
        return out.strip()

    def call(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run(
            [self.program, *args], capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{self.program} {' '.join(args[:3])}... exit {proc.returncode}: "
                f"{proc.stderr.strip()[-2000:]}"
            )
        return proc.stdout

    def exec(self, name: str, *cmd: str, env: dict[str, str] | None = None) -> int:
        extra = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        proc = subprocess.run(
            [self.program, "exec", *extra, name, *cmd], capture_output=True, timeout=120
        )
        return proc.returncode

    def output(self, name: str, *cmd: str) -> str:
        return self.call("exec", name, *cmd)

    def logs(self, name: str) -> str:
        proc = subprocess.run(
            [self.program, "logs", name], capture_output=True, text=True, timeout=60
        )
        return proc.stdout + proc.stderr

    def running(self, name: str) -> bool:
        out = self.call("inspect", "--format", "{{.State.Running}}", name, check=False)
        return out.strip() == "true"

    def remove_all(self) -> None:
        for name in reversed(self.names):
            subprocess.run(
                [self.program, "rm", "-f", "-t", "10", name], capture_output=True, timeout=120
            )
        self.names.clear()


@pytest.fixture(scope="session")
def engine_program() -> str:
    for program in ("podman", "docker"):
        if shutil.which(program) is None:
            continue
        info = subprocess.run([program, "info"], capture_output=True, timeout=60)
        if info.returncode == 0:
            break
    else:
        _unavailable("no container engine (podman, or docker with a running daemon)")
    exists = subprocess.run([program, "image", "inspect", IMAGE], capture_output=True)
    if exists.returncode != 0:
        _unavailable(f"no image {IMAGE}")
    return program


@pytest.fixture
def engine(engine_program: str) -> Iterator[Engine]:
    e = Engine(engine_program)
    yield e
    e.remove_all()


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A host directory that is a shared mount, as /mnt/models is on a
    systemd host: mounts made under it inside a container (bound rshared)
    appear on the host."""
    d = tmp_path / "models"
    d.mkdir()
    subprocess.run(["mount", "--bind", str(d), str(d)], check=True)
    subprocess.run(["mount", "--make-rshared", str(d)], check=True)
    yield d
    # A modelfs mount left under it (a failed test) goes first, lazily.
    for mnt in fuse_mounts_under(d):
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fuse_mounts_under(d: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [
            line.split()[4]
            for line in f
            if " - fuse.modelfs " in line and line.split()[4].startswith(str(d) + "/")
        ]
