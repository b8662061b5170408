"""ckptinit: data-dependent initialisation (Krähenbühl et al., ICLR 2016) for image models.

The package import is light (no torch) so that the CLI's --help is instant; the library
entry points are loaded on first use. The version has one source, pyproject.toml, read
back from the installed package's metadata. The package logger has a NullHandler, so a
program that configures no logging sees nothing from the library.
"""

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ckptinit")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["RescaleOptions", "rescale", "__version__"]


def __getattr__(name: str):
    if name == "rescale":
        from .api import rescale

        return rescale
    if name == "RescaleOptions":
        from .options import RescaleOptions

        return RescaleOptions
    raise AttributeError(name)
