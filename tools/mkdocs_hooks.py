"""MkDocs hooks for the documentation site (mkdocs.yml `hooks:`).

`<!-- keras-parallel --help -->` in a page is replaced by the command's own help
text: `keras-parallel --help`, then `keras-parallel COMMAND --help` for every
subcommand the parser has, so the reference can never drift from the code and a
new subcommand appears by itself. The help is produced by running the command's
`main()` (standard library only: no TensorFlow is imported), at a fixed width
so the page does not depend on the terminal that builds it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- keras-parallel --help -->"
#: Columns the help is wrapped at (argparse reads COLUMNS).
WIDTH = 80


def _help_text(main, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise RuntimeError(f"keras-parallel {' '.join(argv)} exited {stop.code}") from None
    return out.getvalue().rstrip()


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    """The subcommands of the `keras-parallel` parser, in the order `--help` lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def cli_help_markdown() -> str:
    """Markdown: the top-level help, then one section per subcommand with its help."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import keras_parallel_cli

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        parts = [
            "## `keras-parallel`",
            "",
            "```text",
            _help_text(keras_parallel_cli.main, ["--help"]),
            "```",
        ]
        for command in subcommands(keras_parallel_cli.build_parser()):
            parts += [
                "",
                f"## `keras-parallel {command}`",
                "",
                "```text",
                _help_text(keras_parallel_cli.main, [command, "--help"]),
                "```",
            ]
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_help_markdown())
    return markdown
