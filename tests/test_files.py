"""fastgan/files.py, the one writer of every file: a failed write leaves the old file and no temp
file, temp names of a process's own, fsync of the file before the rename and of the folder after
(none with durable=False: the synthetic faces, synced once before their marker), devices and pipes
written straight into (never renamed over). Whole runs on a full, read-only or deleted work_dir
are in test_faults.py. (~1 s)"""

import errno
import os
import socket
import stat
import threading
from concurrent.futures import ProcessPoolExecutor

import pytest

from fastgan import files
from fastgan.errors import WriteError


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def fill_then_fail(error):
    def write(f):
        f.write(os.urandom(4096))     # half of a new file reached the disk
        raise error
    return write


@pytest.mark.parametrize("unique", [False, True])
def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, unique):
    target = tmp_path / "sub" / "stats.json"
    old = os.urandom(1000)
    files.atomic_write(target, lambda f: f.write(old), unique=unique)
    assert target.read_bytes() == old and leftovers(target.parent) == []

    with pytest.raises(WriteError) as e:
        files.atomic_write(target, fill_then_fail(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))), unique=unique)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert str(e.value) == f"cannot write {target}: No space left on device"
    assert target.read_bytes() == old and leftovers(target.parent) == []

    # an error that is not the disk's keeps its type (a bug keeps its traceback); Ctrl-C too
    for error in (ValueError("a bug in the writer"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            files.atomic_write(target, fill_then_fail(error), unique=unique)
        assert target.read_bytes() == old and leftovers(target.parent) == []


@pytest.mark.parametrize("message, code, reason", [
    ("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: ... })", errno.ENOSPC,
     "No space left on device"),                              # safetensors puts the errno in its message
    ("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0", errno.EIO, None),    # torch.save
])
def test_errors_of_writers_without_an_errno(tmp_path, message, code, reason):
    target = tmp_path / "w.bin"
    with pytest.raises(WriteError) as e:
        files.atomic_write(target, fill_then_fail(RuntimeError(message)), failures=(RuntimeError,))
    assert e.value.errno == code and e.value.filename == str(target)
    assert e.value.strerror == (reason or message)
    assert not target.exists() and leftovers(tmp_path) == []


def temp_name(target):
    return files.temp_path(target, unique=True).name


def test_unique_temp_names_name_the_host_and_the_process(tmp_path):
    target = tmp_path / "faces" / "000001.jpg"
    assert files.temp_path(target) == target.with_name("000001.jpg.tmp")
    mine = temp_name(target)
    assert mine == f"000001.jpg.{socket.gethostname()}-{os.getpid()}.tmp"
    with ProcessPoolExecutor(2) as pool:      # synthetic.py's pool workers write side by side
        theirs = set(pool.map(temp_name, [target] * 8))
    assert mine not in theirs and all(n.startswith("000001.jpg.") and n.endswith(".tmp") for n in theirs)

    with files.atomic(target, unique=True) as tmp:
        assert tmp.name == mine
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_remove_stale_takes_only_dead_processes_of_this_host(tmp_path):
    target = tmp_path / "cache.npy"
    host = socket.gethostname()
    names = {"dead": f"cache.npy.{host}-999999999.tmp",             # above any pid_max: no such process
             "alive": f"cache.npy.{host}-{os.getpid()}.tmp",
             "other host": "cache.npy.another-node-1.tmp",
             "other file": f"cache.json.{host}-999999999.tmp"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    assert files.remove_stale(target) == [tmp_path / names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for k, n in names.items() if k != "dead")


def test_fsync_of_the_file_before_the_rename_and_of_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        events.append(("fsync", "folder" if stat.S_ISDIR(mode) else os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "config.json"
    files.write_text(target, "{}\n")
    tmp = str(files.temp_path(target))
    assert events == [("fsync", tmp), ("replace", tmp, str(target)), ("fsync", "folder")]
    assert target.read_text() == "{}\n"

    events.clear()      # a writer that takes a file name: the same
    with files.atomic(target) as path:
        path.write_text("[]\n")
    assert events == [("fsync", tmp), ("replace", tmp, str(target)), ("fsync", "folder")]


def test_not_durable_renames_without_fsync_and_still_never_half(tmp_path, monkeypatch):
    """durable=False (the synthetic faces): no fsync at all, the same rename, the same clean-up."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "faces" / "000001.jpg"
    new = os.urandom(5000)
    with files.atomic(target, unique=True, durable=False) as tmp:
        assert tmp == files.temp_path(target, unique=True)
        tmp.write_bytes(new)
    assert target.read_bytes() == new and leftovers(target.parent) == [] and synced == []
    with pytest.raises(WriteError), files.atomic(target, unique=True, durable=False) as tmp, open(tmp, "wb") as f:
        fill_then_fail(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))(f)
    assert target.read_bytes() == new and leftovers(target.parent) == [] and synced == []
    files.write_text(tmp_path / "faces" / "done.json", "{}")       # the default stays durable
    assert len(synced) == 2


def test_synthetic_faces_are_synced_once_before_their_marker(tmp_path, monkeypatch):
    from fastgan.data import synthetic
    events = []
    real_fsync, real_sync = os.fsync, os.sync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "sync", lambda: (events.append("sync"), real_sync()))
    paths = synthetic.ensure(tmp_path / "faces", 6, num_workers=1, log=lambda *a: None, show=False)
    assert all(p.is_file() for p in paths)
    marker = str(files.temp_path(tmp_path / "faces" / synthetic.MARKER, unique=True))
    assert events[0] == "sync" and events[1] == marker and len(events) == 3     # then the folder


def test_a_pipe_or_device_is_written_into_never_renamed_over(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    got = []
    reader = threading.Thread(target=lambda: got.append(pipe.read_bytes()), daemon=True)
    reader.start()
    files.write_text(pipe, "through the pipe\n")
    reader.join(timeout=30)
    assert got == [b"through the pipe\n"] and stat.S_ISFIFO(os.lstat(pipe).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]

    full = tmp_path / "full"      # our own node of /dev/full (1, 7): a mistake here cannot touch /dev
    try:
        os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        open(full, "wb").close()
    except OSError as e:
        pytest.skip(f"cannot make a device node here: {e}")
    with pytest.raises(WriteError) as e:
        files.write_text(full, "x" * 10000)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(full)
    assert stat.S_ISCHR(os.lstat(full).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["full", "pipe"]
