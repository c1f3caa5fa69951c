"""README.rst is what a newcomer reads first: short, narrow, valid, and its blocks are runnable.

The commands themselves run in tests/integration/test_readme_commands.py; the reference the
README leaves out is in docs/ (tests/unit/test_docs.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.rst"
#: About 300 lines (issue 18): what a newcomer needs first, the rest in docs/.
MOST_LINES = 300
WIDEST = 100


def test_readme_is_short_and_narrow():
    lines = README.read_text().splitlines()
    assert len(lines) <= MOST_LINES, len(lines)
    wide = [(n, len(line)) for n, line in enumerate(lines, 1) if len(line) > WIDEST]
    assert not wide, wide


def test_readme_is_valid_restructuredtext():
    import docutils.core
    import docutils.utils

    problems: list[str] = []
    settings = {"report_level": 5, "halt_level": 5, "warning_stream": False}
    doctree = docutils.core.publish_doctree(README.read_text(), settings_overrides=settings)
    for node in doctree.findall(docutils.nodes.system_message):
        if node["level"] >= docutils.utils.Reporter.WARNING_LEVEL:
            problems.append(node.astext())
    assert not problems, problems


def test_readme_shows_commands_only_in_console_blocks():
    """Every literal block names its language, so every command is in a console block that the
    README test runs (a plain ``::`` block would hide one from it)."""
    text = README.read_text()
    assert not re.search(r"::\n\n", text.replace(".. code-block:: ", "")), \
        "use .. code-block:: console (or json, text) instead of ::"
    languages = set(re.findall(r"^\.\. code-block:: (\S+)$", text, re.MULTILINE))
    assert languages <= {"console", "json", "text"}, languages


def test_readme_configuration_example_is_valid(tmp_path):
    """The cax.json of 'Installing at a site' loads as written (every key known, every value
    of its type, the sites' directories apart)."""
    from cax.config import load_sites

    blocks = re.findall(r"^\.\. code-block:: json\n\n((?:   .*\n|\n)+)", README.read_text(),
                        re.MULTILINE)
    assert len(blocks) == 1
    config = json.loads("\n".join(line[3:] for line in blocks[0].splitlines()))
    (tmp_path / "cax.json").write_text(json.dumps(config))
    sites = load_sites(tmp_path / "cax.json")
    assert [s.name for s in sites.sites] == ["daq", "lab"]
