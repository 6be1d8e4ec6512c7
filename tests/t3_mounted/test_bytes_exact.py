"""Byte-exact reads through a real mount: random (offset, size) ranges,
compared with the origin, over chunk boundaries, EOF, an empty file and a
file larger than 4 GiB (offsets past 2**32)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfs.testing.s3server import JuiceFSGateway

from ..conftest import Mount, Mounter, make_bucket
from ..data import pattern, upload_large

pytestmark = [pytest.mark.mount, pytest.mark.slow]

MiB = 1 << 20
CHUNK = 2 * MiB
FILES = {  # name -> (seed, size)
    "empty.bin": (0, 0),
    "tiny.bin": (1, 1),
    "odd.bin": (2, 7 * MiB + 12345),
    "exact.bin": (3, 4 * CHUNK),
    "huge.bin": (4, (4 << 30) + 3 * MiB + 17),
}


@dataclass
class Fixture:
    mount: Mount
    fds: dict[str, int]


@pytest.fixture(scope="module")
def exact(juicefs: JuiceFSGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    bucket = make_bucket(juicefs)
    for name, (seed, size) in FILES.items():
        if size > 64 * MiB:
            upload_large(bucket.client, bucket.name, name, seed, size)
        else:
            bucket.put(name, pattern(seed, 0, size))
    mounter = Mounter(tmp_path_factory.mktemp("exact"))
    m = mounter(bucket, args=("--chunk-size", "2M"))
    fds = {name: os.open(m.path / name, os.O_RDONLY) for name in FILES}
    yield Fixture(m, fds)
    for fd in fds.values():
        os.close(fd)
    stats = m.stats()
    m.umount()
    problems = m.teardown()
    assert not problems, problems
    # Only what was read was fetched: far less than the 4 GiB object.
    assert stats["store"]["get_bytes"] < 2 << 30


def _offsets(size: int) -> st.SearchStrategy[int]:
    near = [b for k in range(0, size // CHUNK + 2) for b in (k * CHUNK,)]
    near += [size, 1 << 32]
    return st.one_of(
        st.integers(0, size + 10),
        st.sampled_from(near).flatmap(lambda b: st.integers(max(0, b - 300), b + 300)),
    )


@st.composite
def ranges(draw: st.DrawFn) -> tuple[str, int, int]:
    name = draw(st.sampled_from(sorted(FILES)))
    size = FILES[name][1]
    off = draw(_offsets(size))
    length = draw(st.one_of(st.integers(0, 4096), st.integers(0, 3 * CHUNK)))
    return name, off, length


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ranges())
def test_random_ranges_match_origin(exact: Fixture, r: tuple[str, int, int]) -> None:
    name, off, length = r
    seed, size = FILES[name]
    got = os.pread(exact.fds[name], length, off)
    assert got == pattern(seed, min(off, size), min(off + length, size))


def test_sizes_and_whole_small_files(exact: Fixture) -> None:
    for name, (seed, size) in FILES.items():
        p: Path = exact.mount.path / name
        assert p.stat().st_size == size
        if size < 64 * MiB:
            assert p.read_bytes() == pattern(seed, 0, size)


def test_read_across_4gib_boundary(exact: Fixture) -> None:
    seed, size = FILES["huge.bin"]
    fd = exact.fds["huge.bin"]
    start = (1 << 32) - 5 * MiB // 2
    assert os.pread(fd, 5 * MiB, start) == pattern(seed, start, start + 5 * MiB)
    assert os.pread(fd, 100, size - 17) == pattern(seed, size - 17, size)
    assert os.pread(fd, 100, size) == b""
