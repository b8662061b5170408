"""The command line (`ckptinit`): a thin layer of wiring over the library."""

from .app import app, main

__all__ = ["app", "main"]
