"""Files out, safely: output paths checked before any work, and files written all or nothing.

Every file ttreg writes (neuron JSON, reports, PNGs, Markdown, safetensors, feature caches) goes
through :class:`Outputs`: each file is written to a hidden temporary file beside its target and
renamed into place by :meth:`Outputs.commit`, with Ctrl-C held off until the renames are done.
On any failure, or Ctrl-C before the commit, every temporary file and every folder the run
created is removed, so nothing half-written is left.

* A target that exists as a symbolic link, a device node, a FIFO or a socket is refused (it is
  never replaced by a regular file); so is a folder where a file is expected.
* A file that is replaced keeps its permission bits; a new file gets ``0o666`` minus the umask,
  like any file the user creates.
* :func:`check_output_file` and :func:`check_output_folder` say what is wrong with a path (parent
  is a file, no write permission, ...) in one line, before a long computation starts. A path
  that ends in ``/`` names a folder, never a file.
* Folders that do not exist are created (with their parents) when the files are committed, and
  recorded (:func:`created_folders`; the command line prints them); a failed or interrupted run
  removes the folders it created.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["OutputPathError", "Outputs", "atomic_write", "write_json", "write_text",
           "check_output_file", "check_output_folder", "same_file", "committed_count",
           "created_folders", "first_non_finite"]


class OutputPathError(OSError):
    """An output path ttreg will not write to; the message says why in one line."""


_COMMITTED = 0  # files renamed into place by this process (the CLI reports it on Ctrl-C)
_CREATED: list[Path] = []  # folders this process created for files it committed, in order


def created_folders() -> list[Path]:
    """The folders this process created for the files it has written (outermost first), so far."""
    return list(_CREATED)


def committed_count() -> int:
    """How many files this process has written so far (a counter, for "what was written")."""
    return _COMMITTED


def _kind(mode: int) -> str | None:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return None


def _lstat(p: Path) -> os.stat_result | None:
    try:
        return os.lstat(p)
    except FileNotFoundError:
        return None
    except NotADirectoryError:  # a parent is a file: reported by the folder check
        return None


def _existing_ancestor(p: Path) -> Path:
    """The nearest ancestor of ``p`` (``p`` itself included) that exists."""
    q = p
    while not os.path.lexists(q) and q != q.parent:
        q = q.parent
    return q


def _check_folder_writable(folder: Path, what: str, target: Path) -> None:
    """``folder`` (which may not exist yet) can be created and written into."""
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise OutputPathError(f"{what} {target}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {target}: cannot write in {base} (permission denied); "
                              "choose a folder you can write to")


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, in one line, a file path ttreg cannot or will not write: a folder, a symbolic link,
    a device, FIFO or socket, a read-only file, or a parent that is a file or not writable."""
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise OutputPathError(f"{what} {str(path)!r} is not a file name; give one such as result.json")
    if isinstance(path, str) and path.endswith(("/", os.sep)):
        raise OutputPathError(f"{what} {path} ends in '/', so it names a folder, not a file; give a "
                              f"file name (inside it, or without the '/')")
    st = _lstat(p)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputPathError(f"{what} {p} is a folder; give a file name inside it")
        kind = _kind(st.st_mode)
        if kind:
            raise OutputPathError(f"{what} {p} is {kind}, not a regular file; ttreg does not "
                                  "replace it: give another path")
    _check_folder_writable(p.parent, what, p)
    return p


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse, in one line, a folder path ttreg cannot write into (a file, a special file, a
    parent that is a file, no write permission)."""
    p = Path(path)
    if os.path.lexists(p) and not p.is_dir():
        st = os.lstat(p)
        kind = _kind(st.st_mode) or "a file"
        raise OutputPathError(f"{what} {p} is {kind}, not a folder; give a folder")
    _check_folder_writable(p, what, p)
    return p


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Do two paths (existing or not) name the same file?"""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # fallback (not thread-safe for an instant): read and restore
    os.umask(old)
    return old


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold off Ctrl-C (SIGINT) in the main thread for the block; deliver it afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda sig, frame: got.append(sig))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            if callable(old):
                old(signal.SIGINT, None)
            elif old == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


class Outputs:
    """Files written together or not at all (see the module docstring).

    ``with Outputs() as out: out.stage(path, write)`` -- ``write(tmp_path)`` writes the content
    to a temporary path; leaving the block without an exception renames every staged file into
    place; an exception (Ctrl-C included) removes them all.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []   # (temporary, target)
        self._made: list[Path] = []                  # folders this run created, outermost first
        self.written: list[Path] = []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _makedirs(self, folder: Path) -> None:
        missing = []
        q = folder
        while not os.path.lexists(q) and q != q.parent:
            missing.append(q)
            q = q.parent
        for d in reversed(missing):
            os.mkdir(d)
            self._made.append(d)

    def stage(self, target: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
        """Write one file (``write(tmp)``) to a temporary name beside ``target``."""
        target = check_output_file(target)
        if any(same_file(t, target) for _, t in self._staged):
            raise OutputPathError(f"{target} would be written twice in one run; give different paths")
        self._makedirs(target.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:80]}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_p = Path(tmp)
        try:
            write(tmp_p)
            st = _lstat(target)
            mode = stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask()
            os.chmod(tmp_p, mode)
            with open(tmp_p, "rb+") as f:
                os.fsync(f.fileno())
        except BaseException:
            _unlink(tmp_p)
            raise
        self._staged.append((tmp_p, target))
        return target

    def commit(self) -> list[Path]:
        """Rename every staged file into place (Ctrl-C held off meanwhile)."""
        global _COMMITTED
        try:
            with _interrupts_held():
                while self._staged:
                    tmp, target = self._staged[0]
                    st = _lstat(target)  # checked again: the path may have changed meanwhile
                    if st is not None and (_kind(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                        check_output_file(target)
                    os.replace(tmp, target)
                    self._staged.pop(0)
                    self.written.append(target)
                    _COMMITTED += 1
        except BaseException:
            self.abort()
            raise
        _CREATED.extend(self._made)
        self._made = []
        return self.written

    def abort(self) -> None:
        """Remove the staged temporaries and the folders this run created (if left empty)."""
        for tmp, _ in self._staged:
            _unlink(tmp)
        self._staged = []
        for d in reversed(self._made):
            try:
                os.rmdir(d)
            except OSError:
                pass
        self._made = []


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write one file all or nothing: ``write(tmp)`` fills a temporary file, renamed into place."""
    with Outputs() as out:
        return out.stage(path, write)


def _text_writer(text: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def json_text(data: Any) -> str:
    """Indented standard JSON; a NaN or infinity (which JSON has no word for, and strict parsers
    refuse) is a one-line ``ValueError`` that names where it is."""
    try:
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        where = first_non_finite(data) if "Out of range float" in str(e) else None
        if where is None:   # (a circular reference)
            raise
        raise ValueError(f"{where[0]} is {where[1]!r}, and JSON has no NaN or infinity") from None


def write_text(path: str | os.PathLike, text: str, outputs: Outputs | None = None) -> Path:
    """Write UTF-8 text atomically (or stage it in ``outputs``)."""
    if outputs is not None:
        return outputs.stage(path, _text_writer(text))
    return atomic_write(path, _text_writer(text))


def write_json(path: str | os.PathLike, data: Any, outputs: Outputs | None = None) -> Path:
    """Write indented JSON atomically (or stage it in ``outputs``). Serialised before anything is
    written, so data that is not JSON (a NaN included) leaves no file."""
    try:
        text = json_text(data)
    except ValueError as e:
        raise ValueError(f"cannot write {path}: {e}") from None
    return write_text(path, text, outputs)


def first_non_finite(obj: Any, name: str = "") -> tuple[str, float] | None:
    """``(where, value)`` of the first NaN or infinity inside nested dicts and lists (``where``
    like ``statistics.ratio[3]``, after ``name``), or None when there is none."""
    import math
    stack = [(name, obj)]
    while stack:
        where, o = stack.pop()
        if isinstance(o, float) and not math.isfinite(o):
            return where or "the value", o
        if isinstance(o, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in reversed(list(o.items())))
        elif isinstance(o, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(o))))
    return None

