"""The installed imgserve version, in one place for ``imgserve --version`` and the v2 server metadata."""
from __future__ import annotations

from importlib import metadata

UNKNOWN_VERSION = "0+unknown"


def installed_version() -> str:
    """What pip reports for the ``imgserve`` distribution, or a marker when run from a bare checkout."""
    try:
        return metadata.version("imgserve")
    except metadata.PackageNotFoundError:
        return UNKNOWN_VERSION
