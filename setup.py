"""The classic entry point, beside pyproject.toml, which holds all the metadata.

``python setup.py --version`` (and the tools and habits that expect a setup.py) work, while
pip builds from pyproject.toml as before; nothing is declared twice.
"""

import sys

import setuptools

#: pyproject.toml's license is a PEP 639 expression, which setuptools reads from 77 on.
MINIMUM_SETUPTOOLS = 77

if int(setuptools.__version__.split(".")[0]) < MINIMUM_SETUPTOOLS:
    sys.exit(f"setup.py: setuptools {setuptools.__version__} cannot read pyproject.toml's "
             f"metadata; pip install 'setuptools>={MINIMUM_SETUPTOOLS}'")

setuptools.setup()
