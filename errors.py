"""User-facing errors, and the one place where the CLIs turn them into a one-line message.

Any mistake a user can make (bad path, bad data, bad flag value, a checkpoint that does not
fit the model) raises `ForgetlabError` with a message that names the file, the line where there
is one, and what is wrong. Bugs stay ordinary exceptions, with their tracebacks.
"""
import argparse
import json
import sys
from pathlib import Path


class ForgetlabError(Exception):
    """A problem with the user's input, reported as one line on stderr and exit code 2."""


def read_json_object(path, what: str) -> dict:
    """The JSON object in the file `path`, a `what` (for messages: "model config", "results file", ...).
    Missing, unreadable, not JSON, or JSON but not an object: ForgetlabError naming the file, and the line of a
    syntax error. Every JSON file a user hands forgetlab is read through here, so all report alike."""
    path = Path(path)
    if not path.is_file():
        raise ForgetlabError(f"{path}: {what} not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ForgetlabError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (UnicodeDecodeError, RecursionError, OSError) as e:
        raise ForgetlabError(f"{path}: unreadable {what} ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise ForgetlabError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def check_names(expected, found, where: str, what: str = "tensor"):
    """ForgetlabError unless `found` holds exactly the names in `expected`. The message names the first missing
    (else the first unexpected) name and how many more there are: `{where}: missing {what} NAME (and 3 more)`."""
    for kind, names in (("missing", sorted(set(expected) - set(found))),
                        ("unexpected", sorted(set(found) - set(expected)))):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise ForgetlabError(f"{where}: {kind} {what} {names[0]}{more}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown flag, bad value, missing argument) raise ForgetlabError, so that
    run_cli reports them like every other user error: one line, exit 2 (plain argparse prints the usage first)."""

    def error(self, message):
        raise ForgetlabError(f"{message} (see {self.prog} --help)")


def run_cli(main, argv=None):
    """Call `main(argv)`; print ForgetlabError as one line and exit 2, Ctrl-C as exit 130."""
    try:
        main(argv)
    except ForgetlabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
