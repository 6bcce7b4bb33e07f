"""The package list; everything else is in pyproject.toml.

The build stage lives in the folders ``export/`` and ``quantize/`` but installs under
names this project owns, ``edge_slm_export`` and ``edge_slm_quantize``: a top-level
``export`` in site-packages could be shadowed by (or shadow) another distribution or a
user's ``export.py``. setuptools' package discovery cannot rename a folder, so the
packages are listed here, found below each folder.
"""

from setuptools import find_packages, setup

# import name -> folder in the repository
BUILD_STAGE = {"edge_slm_export": "export", "edge_slm_quantize": "quantize"}

setup(
    package_dir=dict(BUILD_STAGE),
    packages=[
        *find_packages(include=["edge_slm", "edge_slm.*"]),
        *(
            f"{name}.{sub}" if sub else name
            for name, folder in BUILD_STAGE.items()
            for sub in ["", *find_packages(folder)]
        ),
    ],
)
