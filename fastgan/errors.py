"""Errors a person can act on: one line, no traceback, a non-zero exit, from every entry point.

    if __name__ == "__main__":
        errors.main(main)            # main(argv=None) -> int | None

`main` runs the entry point and turns what a user can fix into one line on stderr:
  UserError (ConfigError, DataError, CheckpointError, TrainingError, ... derive from it)  exit 1
  OSError (a file or folder that cannot be read or written)                                  exit 1
  torch.OutOfMemoryError, MemoryError (with the entry point's advice, `oom_hint`)            exit 1
  Interrupted (a SIGINT or SIGTERM that stopped training after a checkpoint)                 130 / 143
  KeyboardInterrupt outside the training loop                                                130
  a collective that failed because another rank died or stalled (watchdog.py names the rank) exit 1
Anything else is a bug and keeps its traceback. FASTGAN_DEBUG=1 shows the traceback for all of
them. Under torchrun the line also goes to the worker's error file, so torchrun's failure report
names it instead of "error_file: <N/A>".

This module imports nothing from fastgan at import time (watchdog and files, late, inside the
functions that need them): every other module may import it.
"""

from __future__ import annotations

import json
import os
import sys
import time


class UserError(Exception):
    """Something the person running fastgan can fix: the message says what and how."""


class Interrupted(UserError):
    """Training stopped on a signal after writing a checkpoint; exit status 128 + signal number."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class WriteError(UserError, OSError):
    """A file could not be written (full disk, read-only or vanished folder); nothing was replaced.
    WriteError(errno, reason, path)."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def writable_dir(path, what: str, fix: str) -> None:
    """Make folder `path` if needed and check a file can be created in it; else a UserError
    naming `what` (e.g. "work_dir") and how to `fix` it. Root ignores permission bits, but not a
    read-only filesystem, a full disk's inode table, or a file where a folder should be."""
    import tempfile
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fastgan-probe-"):
            pass
    except OSError as e:
        raise UserError(f"{what} {str(path)!r} cannot be written ({e.strerror or e}): {fix}") from None


def debug() -> bool:
    return os.environ.get("FASTGAN_DEBUG", "") not in ("", "0")


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def first_line(e: BaseException, limit: int = 200, name: bool = False) -> str:
    """The first non-empty line of e's message, cut to `limit` characters, for quoting inside a
    line of our own (torch appends C++ frames after it, Triton a kernel's source); with `name`
    (or an empty message) after the exception's type."""
    line = next((x.strip() for x in str(e).splitlines() if x.strip()), "")[:limit]
    return f"{type(e).__name__}: {line}".rstrip(": ") if name or not line else line


def describe(e: BaseException) -> str:
    """The one-line message for an exception `main` handles."""
    if isinstance(e, UserError):
        return one_line(str(e))
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    return one_line(f"{type(e).__name__}: {e}")


def _rank_prefix() -> str:
    world = os.environ.get("WORLD_SIZE", "1")
    return f"rank {os.environ.get('RANK', '0')}: " if world.isdigit() and int(world) > 1 else ""


def report(line: str, tell: bool = True) -> None:
    """Print `line` to stderr, tell the other ranks (watchdog.py) unless `tell` is off, and leave
    it in torchrun's error file for its failure summary."""
    print(_rank_prefix() + line, file=sys.stderr, flush=True)
    if tell:
        from fastgan import watchdog     # late: it imports torch.distributed
        watchdog.tell_others(line)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:      # the layout torch.distributed.elastic's ErrorHandler writes; its report shows py_callstack
        from fastgan import files        # late: it imports this module
        text = _rank_prefix() + line
        try:
            files.write_text(path, json.dumps({"message": {"message": text, "extraInfo": {
                "py_callstack": text, "timestamp": str(int(time.time()))}}}))
        except OSError:
            pass


def out_of_memory(e: BaseException, advice: str) -> UserError:
    """A UserError for torch.OutOfMemoryError / MemoryError that says what to try."""
    where = "GPU" if type(e).__name__ == "OutOfMemoryError" else "host"
    first = one_line(str(e).split(". ")[0]) if str(e) else type(e).__name__
    return UserError(f"out of {where} memory ({first}): {advice}")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"


def main(fn, argv=None, oom_hint: str = "try a smaller batch size") -> None:
    """Run an entry point's main(argv) and exit with its status, one line for a user's mistake."""
    try:
        code = fn() if argv is None else fn(argv)
    except SystemExit:
        raise
    except Interrupted as e:
        if debug():
            raise
        report(one_line(str(e)), tell=False)     # the other ranks stop the same way; nothing to tell
        _exit(e.code)
    except KeyboardInterrupt:
        if debug():
            raise
        print("interrupted", file=sys.stderr)
        _exit(130)
    except (UserError, OSError) as e:
        if debug():
            raise
        report(f"error: {describe(e)}")
        _exit(1)
    except BaseException as e:
        from fastgan import watchdog
        explained = watchdog.explain(e)          # a collective failed: which rank, and what happened
        if explained and not debug():
            report(f"error: {explained}")
            _exit(1)
        if _is_oom(e) and not debug():
            report(f"error: {out_of_memory(e, oom_hint)}")
            _exit(1)
        raise
    sys.exit(code or 0)


def _exit(code: int) -> None:
    """sys.exit; with a process group up, leave without tearing it down (with a dead or stuck
    peer, destroy_process_group can hang)."""
    from fastgan import watchdog
    if watchdog.group_up():
        watchdog.exit_now(code)
    sys.exit(code)
