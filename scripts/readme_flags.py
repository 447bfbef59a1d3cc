"""Prints the README's "Every CLI flag" table from the CLIs' own argument parsers.

    python scripts/readme_flags.py > /tmp/flags.md   # paste into README.md

tests/test_readme.py checks that README.md holds exactly this table, so it cannot go stale.
"""
import argparse
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIS = ("run_generate.py", "run_languagemodel.py", "run_train.py", "encode_swe.py",
        "scripts/make_tfrecord.py", "scripts/show_tfrecord.py", "scripts/convert_checkpoint.py",
        "scripts/add_layers.py", "scripts/build_vocab.py")
HEADER = ("| CLI | flag | default | meaning |", "|---|---|---|---|")


class _Captured(Exception):
    """Raised instead of parsing: carries the CLI's parser out of its main()."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def cli_parser(path):
    """The argparse parser `path`'s main() builds (main stops at parse_args)."""
    def capture(parser, *args, **kwargs):
        raise _Captured(parser)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    saved_argv = sys.argv
    sys.argv = [path]
    try:
        runpy.run_path(os.path.join(ROOT, path), run_name="__main__")
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv
    raise RuntimeError(f"{path} did not parse arguments")


def flag_rows(path):
    """One markdown row per option of `path`."""
    rows = []
    for action in cli_parser(path)._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        flag = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
        default = action.default
        if isinstance(default, str) and default.startswith(ROOT + os.sep):
            default = os.path.relpath(default, ROOT)  # the same table from any checkout
        default = "" if default in (None, False, "", argparse.SUPPRESS) else f"`{default}`"
        if action.required:
            default = "required"
        meaning = (action.help or "").replace("|", "\\|").replace("\n", " ")
        if action.choices:
            meaning += f" ({' / '.join(map(str, action.choices))})"
        rows.append(f"| `{path}` | {flag} | {default} | {meaning} |")
    return rows


def flag_table():
    """The whole table as markdown lines."""
    lines = list(HEADER)
    for path in CLIS:
        lines.extend(flag_rows(path))
    return lines


if __name__ == "__main__":
    print("\n".join(flag_table()))
