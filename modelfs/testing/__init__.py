"""Test and demo support: local S3 servers and an HTTP proxy that counts.

Shipped in the package because `make demo` and `make bench` use them too;
nothing in the filesystem itself imports this package.
"""
