"""ckptinit: data-dependent initialisation (Krähenbühl et al., ICLR 2016) for image models.

The package import is light (no torch) so that the CLI's --help is instant; the library
entry points are loaded on first use.
"""

__version__ = "0.1.0"

__all__ = ["RescaleOptions", "rescale", "__version__"]


def __getattr__(name: str):
    if name == "rescale":
        from .api import rescale

        return rescale
    if name == "RescaleOptions":
        from .options import RescaleOptions

        return RescaleOptions
    raise AttributeError(name)
