"""The composition root of the chunk cache: a mount and a pull build their
cache here, from the options, with the shared tier when one is configured.
`modelfs/cache/` itself never sees `MountConfig` or the S3 tier classes.
"""

from __future__ import annotations

from .cache import ChunkCache
from .config import MountConfig
from .s3.tier_bucket import S3Tier
from .store import ObjectStore
from .tier import UPLOAD_WORKERS, SharedTier


def shared_tier(cfg: MountConfig) -> SharedTier | None:
    """The --shared-cache tier of these options, or None."""
    if cfg.shared_cache is None:
        return None
    return SharedTier(
        S3Tier(
            cfg.tier_settings(pool=cfg.fetch_concurrency + UPLOAD_WORKERS + 4),
            cfg.shared_cache.bucket,
        ),
        cfg.shared_cache.prefix,
        cfg.source.bucket,
        lease=cfg.shared_cache_lease,
    )


def chunk_cache(cfg: MountConfig, store: ObjectStore) -> tuple[ChunkCache, SharedTier | None]:
    """The cache a mount or a pull with these options uses, and its tier
    (whose uploads the caller drains before it stops)."""
    tier = shared_tier(cfg)
    cache = ChunkCache(
        cfg.resolved_cache_dir,
        store,
        capacity=cfg.cache_size,
        min_free=cfg.min_free_space,
        fetch_concurrency=cfg.fetch_concurrency,
        memory_cache=cfg.memory_cache,
        chunk_size=cfg.chunk_size,
        tier=tier,
    )
    return cache, tier
