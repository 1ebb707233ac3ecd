"""Every file fastgan writes is written whole or not at all, through this module.

    with files.atomic(path) as tmp:                       # writers that take a file name
        image.save(tmp, format="PNG")
    files.atomic_write(path, lambda f: torch.save(state, f), failures=(RuntimeError,))   # a file object
    files.write_text(path, json.dumps(data) + "\n")

The bytes go to a temp file beside the target, which is fsync'ed and renamed over the target, and
then the folder is fsync'ed: a kill or a power cut at any moment leaves the old file or the new one,
never half of one. A write the disk refuses (an OSError, or one of `failures`: a full disk, a
read-only or vanished folder) removes the temp file and raises errors.WriteError naming the target;
any other error removes it too and keeps its type (a bug keeps its traceback). A target that is a
device or a pipe (/dev/null, /dev/stdout) is written straight into: a rename would replace the node.

durable=False skips both fsyncs (the rename alone: whole or absent after the process dies, but a
power cut may lose it) for files that can be made again, where one durable file written after a
sync of them all vouches for the set: the synthetic faces and their marker (the two fsyncs took
0.45 of the 0.7 ms a 9 KB file took here, on an idle disk).

Temp names: <name>.tmp, or with unique=True <name>.<host>-<pid>.tmp, for a file that several
processes may write at once (pool workers; the ranks of several nodes sharing a folder).
checkpoint.remove_temp_files removes a ckpt folder's *.tmp; `remove_stale` removes the unique
temp files of processes on this host that are gone. `numbered` lists a run's iter_N files (the
checkpoints, the sample grids).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import stat
from pathlib import Path

from fastgan.errors import WriteError, first_line


def temp_path(path: str | Path, unique: bool = False) -> Path:
    path = Path(path)
    owner = f".{socket.gethostname()}-{os.getpid()}" if unique else ""
    return path.with_name(f"{path.name}{owner}.tmp")


@contextlib.contextmanager
def atomic(path: str | Path, unique: bool = False, failures: tuple = (), durable: bool = True):
    """Yields the temp path to write; on success it replaces `path` (see the module docstring)."""
    path = Path(path)
    if _device(path):
        try:
            yield path
        except (OSError, *failures) as e:
            raise _write_error(path, e) from e
        return
    tmp = temp_path(path, unique)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if durable:
            _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException as e:       # a KeyboardInterrupt too: no temp file stays behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, *failures)):
            raise _write_error(path, e) from e
        raise
    if not durable:
        return
    with contextlib.suppress(OSError):     # not every platform opens folders
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def atomic_write(path: str | Path, write, unique: bool = False, failures: tuple = ()) -> Path:
    """`write(file_object)` (opened "wb") into the temp file, then as `atomic`."""
    with atomic(path, unique, failures) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def write_text(path: str | Path, text: str, unique: bool = False) -> Path:
    """`text` as UTF-8, through `atomic`."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), unique)


def copy(src: str | Path, dst: str | Path) -> Path:
    """src's bytes at dst, through `atomic`."""
    with atomic(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def numbered(folder: str | Path, suffix: str) -> list[tuple[int, Path]]:
    """(N, path) of every iter_N<suffix> in `folder` (none if it is missing), in iteration order."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    name = re.compile(rf"^iter_(\d+){re.escape(suffix)}$")
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := name.match(p.name)))


def remove_stale(path: str | Path) -> list[Path]:
    """Remove the unique temp files of `path` that processes on this host left behind and are gone
    (a killed build); those of live processes, and of other hosts, stay."""
    path, host = Path(path), socket.gethostname()
    removed = []
    for f in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
        owner, _, pid = f.name[len(path.name) + 1:-len(".tmp")].rpartition("-")
        if owner != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
            removed.append(f)
        except PermissionError:       # alive, another user's
            pass
    return removed


def _device(path: Path) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: Path, e: BaseException) -> WriteError:
    """WriteError(errno, reason, path). torch.save's RuntimeError carries no errno and safetensors
    puts one in its message, so the reason is looked up: no space, a read-only or a vanished folder."""
    if isinstance(e, OSError) and e.errno:
        return WriteError(e.errno, e.strerror, str(path))
    code = re.search(r"\bcode: (\d+)", str(e))       # safetensors: IoError(Os { code: 28, ... })
    if code:
        return WriteError(int(code.group(1)), os.strerror(int(code.group(1))), str(path))
    folder = path.parent
    if not folder.is_dir():
        return WriteError(2, "its folder is gone", str(path))
    try:
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < 1 << 20:
            return WriteError(28, "No space left on device", str(path))
        if st.f_flag & os.ST_RDONLY:
            return WriteError(30, "Read-only file system", str(path))
    except OSError:
        pass
    return WriteError(5, first_line(e), str(path))
