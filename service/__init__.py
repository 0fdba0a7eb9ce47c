"""The HTTP service and command line. Imports go service -> models -> kernels."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bagserve")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
