"""How to reach one S3-compatible endpoint: the settings the S3 code takes.

`modelfs.config.MountConfig` builds one for the origin and one for the
shared tier (`origin_settings`, `tier_settings`), so nothing under
`modelfs.s3` ever sees the whole mount configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None  # None: AWS
    region: str | None
    profile: str | None  # a profile of the shared AWS config
    credentials_file: Path | None  # instead of ~/.aws/credentials
    addressing_style: str  # auto, path or virtual
    unsigned: bool  # anonymous requests (a public bucket)
    connect_timeout: float  # seconds, per attempt
    read_timeout: float  # seconds without bytes, per attempt
    retry_timeout: float  # seconds all attempts of one GET may take
    pool: int  # connections kept to the endpoint

    @property
    def endpoint_name(self) -> str:
        """The endpoint as error messages name it."""
        return self.endpoint_url or "the default AWS endpoint"
