"""The one place boto3 clients are made: session (credentials chain,
--credentials-file, --profile), client settings, checksum headers.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import AccessDenied
from .settings import S3Settings


def session(settings: S3Settings) -> Any:
    """The boto3 session for these settings: credentials come from boto3's
    chain (environment, shared files, web identity, instance metadata);
    --credentials-file only replaces which shared-credentials file it reads."""
    import boto3
    import botocore.session

    try:
        core = botocore.session.Session()
        if settings.credentials_file is not None:
            core.set_config_variable("credentials_file", str(settings.credentials_file))
        made = boto3.Session(
            botocore_session=core, profile_name=settings.profile, region_name=settings.region
        )
        # Once the profile and its files are set: the loader reads its
        # search path from the profile's configuration.
        _quick_loader(core)
        return made
    except Exception as exc:  # ProfileNotFound and friends
        raise AccessDenied(f"cannot load AWS profile {settings.profile!r}: {exc}") from exc


class _KnownServices:
    """What a loader's `list_available_services` answers: S3 at once, any
    other name (STS for web identity, SSO...) after the real listing."""

    def __init__(self, listing: Callable[[], list[str]]) -> None:
        self._listing = listing

    def __contains__(self, name: object) -> bool:
        return name == "s3" or name in self._listing()

    def __iter__(self) -> Iterator[str]:
        return iter(self._listing())


class _PlainJSONFiles:
    """botocore's model files, parsed into plain dicts. botocore's own file
    loader builds every object as an OrderedDict through a Python hook:
    S3's model, its endpoint rules and the endpoints table took 34 ms to
    parse that way against 18 ms plain, at every mount. A dict keeps the
    order too, and botocore asks nothing of its models that a dict lacks."""

    _FORMS: tuple[tuple[str, Callable[..., Any]], ...] = ((".json", open), (".json.gz", gzip.open))

    def exists(self, file_path: str) -> bool:
        return any(os.path.isfile(file_path + ext) for ext, _ in self._FORMS)

    def load_file(self, file_path: str) -> Any:
        for ext, opener in self._FORMS:
            try:
                with opener(file_path + ext, "rb") as f:
                    return json.loads(f.read())
            except FileNotFoundError:
                continue
        return None


def _quick_loader(core: Any) -> None:
    """Two shortcuts in the session's model loader, for a quicker mount.
    Before it loads a model, botocore lists every service it has models
    for, to check the name asked for is one: 460 directories read, twice
    (the service model and the endpoint rules), 45 ms of a warm start and
    more after a boot, when each is read from disk. For S3 the loader now
    answers at once; another service botocore loads for itself (STS, for
    web identity credentials) still gets the real listing. And its files
    are parsed into plain dicts (`_PlainJSONFiles`)."""
    loader = core.get_component("data_loader")
    listing = loader.list_available_services
    loader.list_available_services = lambda type_name: _KnownServices(
        functools.partial(listing, type_name)
    )
    loader.file_loader = _PlainJSONFiles()


def client(
    boto_session: Any,
    settings: S3Settings,
    *,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    retries: dict[str, Any],
    pool: int | None = None,
) -> Any:
    """An S3 client of `boto_session`; timeouts and pool default to the
    settings' own."""
    import botocore
    import botocore.config

    # --no-sign-request: anonymous requests, for public buckets; no
    # credentials are looked for.
    signing = {"signature_version": botocore.UNSIGNED} if settings.unsigned else {}
    return boto_session.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        config=botocore.config.Config(
            connect_timeout=settings.connect_timeout
            if connect_timeout is None
            else connect_timeout,
            read_timeout=settings.read_timeout if read_timeout is None else read_timeout,
            retries=retries,
            max_pool_connections=settings.pool if pool is None else pool,
            s3={"addressing_style": settings.addressing_style},
            tcp_keepalive=True,
            **checksum_settings(boto_session, settings.endpoint_url),
            **signing,
        ),
    )


def checksum_settings(session: Any, endpoint_url: str | None) -> dict[str, str]:
    """boto3 >= 1.36 adds CRC checksum headers to every PUT and asks for
    checksums on GETs; several S3-compatible stores reject or mishandle them
    (the shared tier PUTs chunks). Against a custom endpoint modelfs sends
    them only when an operation requires it, unless the user chose
    otherwise (AWS_REQUEST_CHECKSUM_CALCULATION,
    AWS_RESPONSE_CHECKSUM_VALIDATION, or the same keys in the AWS config)."""
    if endpoint_url is None:
        return {}
    try:
        profile = session._session.get_scoped_config()
    except Exception:  # a profile that does not exist fails later, clearly
        profile = {}
    out = {}
    for key, env in (
        ("request_checksum_calculation", "AWS_REQUEST_CHECKSUM_CALCULATION"),
        ("response_checksum_validation", "AWS_RESPONSE_CHECKSUM_VALIDATION"),
    ):
        if env not in os.environ and key not in profile:
            out[key] = "when_required"
    return out
