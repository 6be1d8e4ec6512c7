"""Unit tier: `modelfs.cache.directory`, which directories may become a cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfs.cache import directory
from modelfs.errors import CacheError, CacheFormatError


def test_an_absent_directory_is_created_owner_only(tmp_path: Path) -> None:
    root = tmp_path / "a" / "cache"
    assert directory.vet(root) is False
    directory.claim(root)
    assert root.is_dir() and root.stat().st_mode & 0o777 == 0o700
    directory.check_format(root)
    assert directory.vet(root) is True


def test_someone_elses_directory_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CacheError, match="not empty and is not a modelfs cache"):
        directory.claim(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_another_format_is_refused(tmp_path: Path) -> None:
    directory.claim(tmp_path / "c")
    (tmp_path / "c" / directory.FORMAT_FILE).write_text('{"format": 99}')
    with pytest.raises(CacheFormatError, match="format 99"):
        directory.check_format(tmp_path / "c")


@pytest.mark.parametrize("part", ["data", "index", "lock", "modelfs.log", "data/ab", "data/ab/x"])
def test_a_cache_holding_a_link_is_refused_in_one_line(tmp_path: Path, part: str) -> None:
    root = tmp_path / "c"
    directory.claim(root)
    directory.check_format(root)
    (root / part).parent.mkdir(parents=True, exist_ok=True)
    (root / part).symlink_to(tmp_path)
    with pytest.raises(CacheError) as info:
        directory.vet(root)
    assert "symbolic link" in str(info.value) and "\n" not in str(info.value)


def test_a_cache_inside_the_mountpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="inside the mountpoint"):
        directory.refuse_inside(tmp_path / "mnt" / "c", tmp_path / "mnt")
    directory.refuse_inside(tmp_path / "c", tmp_path / "mnt")


def test_membership_tells_whether_others_use_the_cache(tmp_path: Path) -> None:
    directory.claim(tmp_path / "c")
    one = directory.Membership(tmp_path / "c")
    one.set_up()
    assert one.alone()
    two = directory.Membership(tmp_path / "c")
    two.set_up()
    assert not one.alone() and not two.alone()
    two.close()
    assert one.alone()
    one.close()
