"""Version guards shared by the engine patches."""
from __future__ import annotations

from importlib import metadata

from packaging.version import Version


class UnsupportedEngineVersion(RuntimeError):
    """A patch was asked to apply to an engine version it was not written for."""


def engine_version(*dists: str) -> Version:
    """The installed version of the first distribution found among ``dists`` (local label dropped)."""
    for dist in dists:
        try:
            return Version(Version(metadata.version(dist)).base_version)
        except metadata.PackageNotFoundError:
            continue
    raise UnsupportedEngineVersion(f"none of {dists} is installed")


def require_version(patch: str, version: Version, lowest: str, below: str) -> None:
    """Refuse, loudly, outside ``[lowest, below)``."""
    if not (Version(lowest) <= version < Version(below)):
        raise UnsupportedEngineVersion(
            f"lcx patch '{patch}' supports engine versions >={lowest},<{below}; found {version}. "
            "Upgrade lcx, or pin the engine to a supported version."
        )
