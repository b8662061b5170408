"""The sample photos (the default calibration data). They live here, at the top of the
repository, and install as the package data of `ckptinit.samples` (pyproject.toml), where
`ckptinit.data.samples_dir()` finds them in every kind of install."""
