"""User-facing errors, and the one place where the CLIs turn them into a one-line message.

Any mistake a user can make (bad path, bad data, bad flag value, a checkpoint that does not
fit the model) raises `ForgetlabError` with a message that names the file, the line where there
is one, and what is wrong. Bugs stay ordinary exceptions, with their tracebacks.
"""
import argparse
import errno
import json
import math
import os
import shutil
import sys
import traceback
from pathlib import Path


class ForgetlabError(Exception):
    """A problem with the user's input, reported as one line on stderr and exit code 2."""


class DuplicateKeyError(ValueError):
    """A JSON object that names one key twice (json.loads would silently keep the last)."""


def unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook: the object as a dict, DuplicateKeyError if a key appears twice."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise DuplicateKeyError(f"duplicate key {k!r}")
        d[k] = v
    return d


def loads_strict(text: str):
    """json.loads, refusing an object with a repeated key (DuplicateKeyError): every JSON a user hands
    forgetlab is parsed through here."""
    return json.loads(text, object_pairs_hook=unique_keys)


def finite_float(text: str) -> float:
    """argparse type for a float flag: a number, and a finite one (nan and inf would poison every weight)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return x


def read_json_object(path, what: str) -> dict:
    """The JSON object in the file `path`, a `what` (for messages: "model config", "results file", ...).
    Missing, unreadable, not JSON, or JSON but not an object: ForgetlabError naming the file, and the line of a
    syntax error. Every JSON file a user hands forgetlab is read through here, so all report alike."""
    path = Path(path)
    if not path.is_file():
        raise ForgetlabError(f"{path}: {what} not found")
    try:
        d = loads_strict(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ForgetlabError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except DuplicateKeyError as e:
        raise ForgetlabError(f"{path}: not valid {what} ({e})") from None
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


REPO = Path(__file__).resolve().parent


def recorded_path(value):
    """How a record (config.json, results.json) names a file: relative to the repository when it lies inside it
    or in the shared data beside it (../shared), so that a committed record means the same on every checkout;
    anything else as it is."""
    if isinstance(value, str) and os.path.isabs(value):
        path = Path(value).resolve()
        for root, prefix in ((REPO, ""), (REPO.parent / "shared", "../shared/")):
            if path.is_relative_to(root):
                return prefix + path.relative_to(root).as_posix()
    return value


def nearest_existing(path) -> Path:
    """`path` itself if it exists, else its nearest ancestor that does: where a file or directory would be made."""
    path = Path(path).absolute()
    return next((p for p in (path, *path.parents) if p.exists()), Path("/"))


def can_create(path) -> tuple[bool, Path]:
    """(whether `path` can be made, the existing directory it would be made in): that one must be a writable
    directory. Checked before anything slow, so that the results of a long run have somewhere to go."""
    parent = nearest_existing(path)
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK), parent


def no_space_error(path, e: OSError, needed_bytes: int | None = None) -> ForgetlabError | None:
    """The one-line error for a write that found the disk full (ENOSPC, EDQUOT, or safetensors' wording of
    them), naming the path, the space it needed when known and the space free; None for any other error."""
    text = str(e)
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text \
        or "Disk quota exceeded" in text
    if not full:
        return None
    free = shutil.disk_usage(nearest_existing(path)).free
    need = f"about {mib(needed_bytes)} needed, " if needed_bytes else ""
    return ForgetlabError(f"{path}: no space left on the device ({need}{mib(free)} free)")


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def is_main_process() -> bool:
    """Rank 0 under torchrun (its RANK variable), or a process on its own: the one that prints user errors."""
    return os.environ.get("RANK", "0") == "0"


def run_cli(main, argv=None):
    """Call `main(argv)`; print ForgetlabError as one line and exit 2, Ctrl-C as exit 130.

    Under torchrun every rank meets the same user error (they check the same flags and files, and agree on
    what only one rank can see, e.g. its checkpoint shard): rank 0 prints it, every rank exits 2.
    FORGETLAB_TRACEBACK=1 prints the traceback behind the line too (e.g. of a plug-in that fails to import)."""
    try:
        main(argv)
    except ForgetlabError as e:
        if is_main_process():
            if os.environ.get("FORGETLAB_TRACEBACK") == "1":
                traceback.print_exception(e.__cause__ or e, file=sys.stderr)
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
