"""Writing without losing anything the user owns.

    write_atomically(path, write)             one file: written under a temporary name, renamed into place
    check_output_file(out, inputs)            a program's one output file: no input, no folder, not inside an input
                                              folder, and new (or, with `replace`, an earlier output to be replaced)
    with new_folder(out, inputs) as tmp: ...  a whole output folder: written in a temporary sibling, renamed into
                                              place when complete; refused before anything is written when `out`
                                              holds files, is a file, or overlaps an input folder
    check_run_folder(out, marker, inputs)     a program's run folder (train.py's, eval.py's): new, empty, or one
                                              the same program started (its `marker` file is there); never a
                                              folder of the user's files, an input, or a folder inside one

A rename within one folder is atomic, so a crash, a kill or a full disk leaves either the old file (folder) or the new
one, never half of either; what was half written is a temporary name the next run ignores or removes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator


class OutputError(ValueError):
    """An output path that would overwrite or mix with what is already there: nothing has been written."""


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write to a temporary name, then rename: a crash mid-write never leaves a half-written file under `path`. The
    temporary name is one that no file holds (a user's `path.tmp` beside `path` is never written over or removed)."""
    path = Path(path)
    tmp = _free_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill mid-write: the old file stays, no half-written one
        raise


def _free_name(path: Path) -> Path:
    """A hidden name beside `path` that no file holds: .NAME.<pid>.tmp, or with a counter where that is taken."""
    for attempt in itertools.count():
        suffix = f".{attempt}" if attempt else ""
        tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}.tmp")
        if not os.path.lexists(tmp):
            return tmp
    raise AssertionError("unreachable")


def _resolve(path: str | Path, shown: str | None = None) -> Path:
    """`path` made absolute with its symbolic links followed; a link loop is an OutputError naming `shown`, not a
    RuntimeError (Python 3.11) or OSError deep in pathlib."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as err:
        raise OutputError(f"{shown or path}: cannot be resolved ({err}); a symbolic link loop?") from None


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _overlapped_input(out: Path, inputs: Iterable[str | Path]) -> Path | None:
    """The first input folder `out` is, lies in or holds (resolved), or None."""
    return next((source for source in map(_resolve, inputs) if _overlaps(out, source)), None)


def _nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists: where a new output's folders would be made, and so must be
    writable."""
    while not path.exists():
        path = path.parent
    return path


def check_new_folder(out: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """`out` may be written as a new folder: it is not a file, holds nothing, is no input folder (nor inside one or
    around one), and its parent can be written. Checked before any work, so that nothing is lost to a late refusal."""
    out = _resolve(out)
    if (source := _overlapped_input(out, inputs)) is not None:
        raise OutputError(f"{out}: the output folder overlaps the input {source}; write to another folder")
    if out.is_file():
        raise OutputError(f"{out}: is a file, not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        raise OutputError(f"{out}: already holds files; choose a new or empty output folder (nothing was written)")
    parent = _nearest_existing(out.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: {parent} is not writable; choose another output folder")
    return out


def check_run_folder(out: str | Path, marker: str, inputs: Iterable[str | Path] = ()) -> Path:
    """`out` can hold a program's run: it overlaps no input (the model, the data), is not a file, can be written, and
    is new, empty or a run this program started (it holds `marker`, the file the program writes first). A folder of
    other files is refused before anything is read or loaded: a run would write among, and clear, files it did not
    write. Returns `out` resolved; the caller decides what to do with a run that is there (resume it, or refuse)."""
    out = _resolve(out, f"--out {out}")
    if (source := _overlapped_input(out, inputs)) is not None:
        raise OutputError(f"--out {out}: overlaps the input {source}; write the run to another folder")
    if out.is_file():
        raise OutputError(f"--out {out}: is a file, not a run folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise OutputError(f"--out {out}: holds files but no {marker}, so it is not a run of this program; choose a "
                          f"new or empty --out (nothing was written)")
    existing = _nearest_existing(out)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: {existing} is not writable; choose another --out")
    return out


def check_output_file(out: str | Path, inputs: Iterable[str | Path] = (), replace: bool = False,
                      option: str | None = None) -> Path:
    """`out` may be written as a program's one output file (through `write_atomically`): it is none of the `inputs`
    (a symbolic link to one included), not inside an input folder, not a folder, its folder exists (or can be made)
    and can be written, and it does not exist yet, unless `replace` (a program's own rule for replacing an earlier
    output of its own, such as evals.plot's --force). Checked before any work, so nothing is lost to a late refusal.
    `option` (e.g. "--out") names the option in the messages. Returns `out` resolved."""
    shown = f"{option} {out}" if option else str(out)
    given = Path(out)
    resolved = _resolve(given, shown)
    for source in inputs:
        source_path = Path(source)
        if not os.path.lexists(source_path):
            continue  # a missing input is its reader's error, which names it
        source_path = _resolve(source_path)
        if resolved == source_path:
            raise OutputError(f"{shown}: is also an input ({source}); write the output to another file")
        if source_path.is_dir() and source_path in resolved.parents:
            raise OutputError(f"{shown}: is inside the input folder {source}; write the output elsewhere")
    if resolved.is_dir():
        raise OutputError(f"{shown}: is a folder, not a file; name the output file")
    if os.path.lexists(given) and not replace:
        raise OutputError(f"{shown}: already exists; remove it or choose another output file (nothing was written)")
    existing = _nearest_existing(resolved.parent)
    if not existing.is_dir():
        raise OutputError(f"{shown}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: {existing} is not writable; choose another output file")
    return resolved


@contextlib.contextmanager
def new_folder(out: str | Path, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """A temporary folder beside `out` to write into; renamed to `out` when the block ends without an error, removed
    when it raises. `out` is checked first (`check_new_folder`)."""
    out = check_new_folder(out, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process of the same pid that was killed
    tmp.mkdir()
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty (checked above): the rename needs the name free
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
