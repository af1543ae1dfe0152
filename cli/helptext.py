"""Help text for the terminal: source docstrings are wrapped for the editor, rich wraps for the screen.

Typer keeps every newline of a docstring, so a paragraph wrapped at ~90 columns in the source
breaks mid-sentence again in an 80-column terminal. :func:`reflow` makes each paragraph, or
each item of a list, one line and leaves the wrapping to rich.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

BACKEND_METAVAR = "ENGINE"
BACKEND_NAMES = "mocker, vllm, sglang, trtllm"  # core.profile.BACKENDS, for --backend help (a test keeps them equal)


def reflow(text: str) -> str:
    """One line per paragraph or list item.

    A paragraph whose first line ends with ':' and whose other lines are all indented is a
    header with items (examples), one per line. In a paragraph with some indented lines, an
    unindented line starts an item and indented lines continue it. Any other paragraph is prose.
    """
    out = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines = [line for line in paragraph.splitlines() if line.strip()]
        if not lines:
            continue
        rest = lines[1:]
        if lines[0].rstrip().endswith(":") and rest and all(line.startswith(" ") for line in rest):
            out.append("\n".join(lines))
            continue
        listed = any(line.startswith(" ") for line in rest)
        items: list[str] = []
        for line in lines:
            if items and (line.startswith(" ") or not listed):
                items[-1] += " " + line.strip()
            else:
                items.append(line.strip())
        out.append("\n".join(items))
    return "\n\n".join(out)


def reflow_help(app: typer.Typer) -> None:
    """Reflow the help of every command and group of ``app``, recursively."""
    callbacks = [command.callback for command in app.registered_commands]
    if app.registered_callback is not None:
        callbacks.append(app.registered_callback.callback)
    for callback in callbacks:
        if callback is not None and callback.__doc__:
            callback.__doc__ = reflow(callback.__doc__)
    if app.info.help and isinstance(app.info.help, str):
        app.info.help = reflow(app.info.help)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            reflow_help(group.typer_instance)


def _value_name(param) -> str:
    """What to type for an option whose code gives no metavar, from its declared type (typer's own
    parameter classes since 0.2x describe it in ``type_descriptor``; older ones are click's)."""
    desc = getattr(param, "type_descriptor", None)
    if desc is not None:
        if desc.is_choice:
            return "|".join(str(getattr(c, "value", c)) for c in desc.choices)
        if desc.is_path or desc.is_file:
            return "PATH"
        kind = desc.annotation if isinstance(desc.annotation, type) else None
    else:
        kind = {"integer": int, "float": float, "path": Path, "file": Path}.get(getattr(param.type, "name", ""))
        choices = getattr(param.type, "choices", None)
        if choices:
            return "|".join(map(str, choices))
    if kind is not None and issubclass(kind, bool):
        return "BOOLEAN"
    if kind is int:
        return "N"
    if kind is float:
        return "NUMBER"
    if kind is Path:
        return "PATH"
    return (param.name or "value").upper().replace("_", "-")


def readable_metavars(command) -> None:
    """Show what to type, not Python types: ``PROFILE`` instead of typer's ``{profile}`` and ``<str>``,
    ``N`` instead of ``<int range>``, nothing after a flag instead of ``<bool>``. Applied to the whole
    command tree once; a metavar given in the code is kept."""
    for param in command.params:
        if param.metavar is not None:
            continue
        if param.param_type_name == "argument":
            param.metavar = (param.name or "arg").upper()
        elif getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        else:
            param.metavar = _value_name(param)
    for sub in (getattr(command, "commands", None) or {}).values():
        readable_metavars(sub)
