"""Sphinx configuration of cax's documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (tests/unit/test_docs.py
does, and fails on any warning).  The pages need nothing of cax installed: the configuration
reference is generated into ``configuration.rst`` from ``cax/schema.py`` by that test's module.
"""

import re
from pathlib import Path

_INIT = Path(__file__).resolve().parent.parent / "cax" / "__init__.py"

project = "cax"
author = "The cax developers"
project_copyright = "2016-2026, the cax developers (see AUTHORS.rst)"
release = re.search(r'__version__ = "([^"]+)"', _INIT.read_text()).group(1)
version = release

extensions: list[str] = []
root_doc = "index"
exclude_patterns = ["_build"]
# Literal blocks (::) are text; code-block directives name their language.
highlight_language = "none"
html_theme = "alabaster"
html_title = f"cax {release}"
# Wide enough for a 100-character line in a literal block.
html_theme_options = {"page_width": "1180px", "body_max_width": "none"}
