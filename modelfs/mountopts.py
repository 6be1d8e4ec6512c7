"""mount(8)-style invocations: ``modelfs SOURCE MOUNTPOINT -o OPTIONS``.

Owns turning the forms mount(8), mount.fuse3 and fstab produce into the
ordinary ``modelfs mount`` argument list. Every ``--long-option`` of
``modelfs mount`` can be written as ``-o key=value`` (dashes or underscores),
a flag as ``-o key``. Options that belong to fstab, mount(8) or systemd are
dropped here; anything else unknown is an error that names the key only,
never its value, because values may be secrets typed in the wrong place.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import ConfigError

# Consumed by mount(8), systemd or fstab bookkeeping, not by the filesystem.
IGNORED = frozenset(
    {"defaults", "auto", "noauto", "_netdev", "nofail", "user", "users", "nouser", "owner"}
)
IGNORED_PREFIXES = ("x-systemd.", "x-", "comment=")
# Generic VFS flags mount(8) may pass along. modelfs is always read-only,
# nodev and nosuid, so these change nothing; "rw" is accepted for the same
# reason a read-only medium accepts it: the mount is read-only regardless.
VFS_FLAGS = frozenset(
    {
        "ro",
        "rw",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "noexec",
        "atime",
        "noatime",
        "relatime",
        "norelatime",
        "strictatime",
        "nodiratime",
        "async",
        "default_permissions",
    }
)


def split_options(text: str) -> list[str]:
    """``a=1,b,c=x`` -> ["a=1", "b", "c=x"]; empty items are skipped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def options_to_args(
    options: Iterable[str], flags: frozenset[str], valued: frozenset[str]
) -> list[str]:
    """Translate -o items into ``--long-option [value]`` tokens.

    `flags` and `valued` are the long option names (without dashes) of
    ``modelfs mount`` that take no value and one value respectively.
    """
    out: list[str] = []
    for item in options:
        key, has_value, value = item.partition("=")
        if item in IGNORED or item.startswith(IGNORED_PREFIXES) or item in VFS_FLAGS:
            continue
        name = key.strip().replace("_", "-")
        if name in flags:
            if has_value:
                raise ConfigError(f"mount option {key!r} takes no value")
            out.append(f"--{name}")
        elif name in valued:
            if not has_value or not value:
                raise ConfigError(f"mount option {key!r} needs a value: {key}=VALUE")
            out += [f"--{name}", value]
        else:
            raise ConfigError(
                f"unknown mount option {key!r}; see 'modelfs mount --help' for the options"
            )
    return out


def expand_o(argv: list[str], flags: frozenset[str], valued: frozenset[str]) -> list[str]:
    """Replace every ``-o OPTS`` / ``-oOPTS`` in `argv` by long options."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "-o":
            if i + 1 >= len(argv):
                raise ConfigError("-o needs a comma-separated list of options")
            out += options_to_args(split_options(argv[i + 1]), flags, valued)
            i += 2
            continue
        if tok.startswith("-o") and not tok.startswith("--"):
            out += options_to_args(split_options(tok[2:]), flags, valued)
        else:
            out.append(tok)
        i += 1
    return out


def helper_argv(argv: list[str]) -> tuple[list[str], bool]:
    """Arguments of ``mount.modelfs`` (as mount(8) calls a helper) -> modelfs's.

    mount(8) runs ``mount.TYPE SPEC DIR [-sfnv] [-N NS] [-o OPTS] [-t TYPE]``.
    -s (sloppy), -n (no mtab) and -v change nothing here and -t names our own
    type. -f means "fake": do everything but mount; the second value returned
    says so. -N is refused: enter another mount namespace with nsenter.
    """
    out: list[str] = []
    fake = False
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "-N":
            raise ConfigError("mount.modelfs does not support -N; use nsenter")
        if tok == "-t":
            i += 2
            continue
        if len(tok) > 1 and tok[0] == "-" and set(tok[1:]) <= set("sfnv"):
            fake = fake or "f" in tok
            i += 1
            continue
        out.append(tok)
        i += 1
    return out, fake
