"""README.rst documents what the code does: its configuration reference is the schema's."""

from __future__ import annotations

import re
from pathlib import Path

from cax.schema import reference_rst

README = Path(__file__).resolve().parents[2] / "README.rst"
BEGIN, END = ".. BEGIN CONFIG REFERENCE\n\n", "\n.. END CONFIG REFERENCE"


def update_readme() -> None:
    """Rewrite the reference section from the schema (run this module as a script)."""
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + reference_rst() + text[end:])


def test_readme_config_reference_matches_schema():
    text = README.read_text()
    section = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    assert section == reference_rst(), "run: python tests/unit/test_readme.py"


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


def test_readme_names_every_task():
    from cax.tasks import TASKS

    text = README.read_text()
    for task in TASKS:
        assert re.search(rf"``{task.name}``", text), task.name


#: The configuration behind the README's sample start-up errors.
SAMPLE_CONFIG = {"runs_db": "embedded:runsdb", "sites": [
    {"name": "midway", "method": "local", "dir_raw": "/data/m", "data_type": ["raw"],
     "uplaod_options": 1, "port": "22"},
    {"name": "lngs", "method": "local", "dir_raw": "/data/l", "data_type": ["raw"],
     "upload_options": ["nowhere"]}]}


def test_readme_sample_config_errors_are_what_cax_prints(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from cax.cli import cli

    (tmp_path / "cax.json").write_text(json.dumps(SAMPLE_CONFIG))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--once", "--dry-run", "--config", "cax.json",
                                      "--host", "midway"])
    printed = [line for line in result.stderr.splitlines() if line.strip()]
    shown = [line.strip() for line in README.read_text().splitlines()
             if line.startswith("    cax: cax.json: site ")]
    assert result.exit_code == 2
    assert shown == printed


if __name__ == "__main__":
    update_readme()
