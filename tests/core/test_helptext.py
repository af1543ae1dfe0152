"""CLI help reads well in an 80-column terminal: paragraphs are rewrapped, examples and lists keep their lines."""

from __future__ import annotations

import os

from dynamo.cli.helptext import reflow
from tests.conftest import dynamo


def test_reflow_joins_prose_and_keeps_examples_and_list_items():
    text = """Summary line.

    Prose wrapped in the
    source for the editor.

    Examples:
      dynamo a
      dynamo b

    TTFT: first token
      continued here.
    E2EL: last byte.
    """
    assert reflow(text) == ("Summary line.\n\nProse wrapped in the source for the editor.\n\n"
                            "Examples:\n  dynamo a\n  dynamo b\n\nTTFT: first token continued here.\nE2EL: last byte.")


def test_help_paragraphs_wrap_at_the_terminal_width_not_the_source_width():
    shown = dynamo("serve", "--help", env={"COLUMNS": "80", "TERM": os.environ.get("TERM", "dumb")}).stdout
    lines = [line.strip() for line in shown.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("Order:"))
    paragraph = lines[start:lines.index("", start)]
    assert len(paragraph) >= 2 and all(len(line) > 60 for line in paragraph[:-1]), paragraph
