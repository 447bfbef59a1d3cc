"""The project's user-error exception and the CLI wrapper that turns it into one line."""
import argparse
import sys


class GPTSANError(ValueError):
    """A mistake in the user's input (files, flags, configs): reported as one line, exit code 2."""


USER_ERROR_EXIT_CODE = 2  # argparse's exit code for usage errors; all our CLIs use it for bad input


def run_cli(main, argv=None):
    """Runs `main(argv)`; a GPTSANError is printed as `error: <message>` and exits 2."""
    try:
        code = main(argv)
    except GPTSANError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a GPTSANError (one line, exit 2 via run_cli)."""

    def error(self, message):
        raise GPTSANError(f"{message} (see --help)")
