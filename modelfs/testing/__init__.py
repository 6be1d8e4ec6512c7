"""Test and demo support: local S3 servers, an HTTP proxy that counts, and
in-memory doubles of the store and the tier.

Shipped in the package because `make demo` and `make bench` use them too;
nothing in the filesystem itself imports this package.
"""
