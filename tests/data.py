"""Deterministic test data: any byte range of a virtual object, computed on demand.

Byte i of object `seed` is a function of (seed, i), so a test can check any
range of a multi-GiB object without holding it in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

_MUL = np.uint64(0x9E3779B97F4A7C15)


def pattern(seed: int, start: int, end: int) -> bytes:
    """Bytes [start, end) of the virtual object `seed`."""
    if end <= start:
        return b""
    first, last = start // 8, (end + 7) // 8
    words = np.arange(first, last, dtype=np.uint64)
    with np.errstate(over="ignore"):
        words = (words + np.uint64(seed) * np.uint64(1 << 40)) * _MUL
        words ^= words >> np.uint64(29)
    raw = words.astype("<u8").tobytes()
    off = start - first * 8
    return raw[off : off + end - start]


def pattern_parts(seed: int, size: int, part: int = 64 << 20) -> Iterator[bytes]:
    for start in range(0, size, part):
        yield pattern(seed, start, min(size, start + part))


def upload_large(client: object, bucket: str, key: str, seed: int, size: int) -> None:
    """Multipart upload of a virtual object without holding it in memory."""
    mpu = client.create_multipart_upload(Bucket=bucket, Key=key)  # type: ignore[attr-defined]
    parts = []
    for n, body in enumerate(pattern_parts(seed, size, 256 << 20), start=1):
        r = client.upload_part(  # type: ignore[attr-defined]
            Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=n, Body=body
        )
        parts.append({"PartNumber": n, "ETag": r["ETag"]})
    client.complete_multipart_upload(  # type: ignore[attr-defined]
        Bucket=bucket, Key=key, UploadId=mpu["UploadId"], MultipartUpload={"Parts": parts}
    )


def put_shards(bucket: Any, seed: int, n: int, size: int, step: int) -> dict[str, bytes]:
    """Upload `n` shards ``m/shard-<i>.safetensors`` of ``size + step * i``
    bytes through `bucket.put`; returns key -> bytes."""
    files = {f"m/shard-{i}.safetensors": pattern(seed + i, 0, size + step * i) for i in range(n)}
    for key, value in files.items():
        bucket.put(key, value)
    return files


def manifest_doc() -> dict[str, Any]:
    """A valid one-object manifest of s3://bkt/m/, for tests to spoil."""
    return {
        "format": "modelfs-manifest/1",
        "bucket": "bkt",
        "prefix": "m/",
        "taken": "2026-12-02T00:00:00Z",
        "objects": [
            {
                "key": "m/a",
                "size": 3,
                "etag": '"x"',
                "version_id": None,
                "last_modified": "2026-12-01T10:00:00.000000Z",
            }
        ],
    }
