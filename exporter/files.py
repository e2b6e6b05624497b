"""Files llmtrt writes: one artifact-directory writer, one atomic-file writer, content hashes.

    with artifact_dir("out/onnx") as tmp:      # a temporary sibling of out/onnx
        write model.onnx, model.onnx.data, manifest.json into tmp
    # out/onnx now is exactly what was written, swapped in by one rename

A stage never writes into its output directory in place: everything goes into a temporary sibling
(``.onnx.partial-<pid>-<tag>``), which replaces the directory in one step when the stage succeeds
(``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else two renames). An exception or a
``kill -9`` leaves ``--out`` as it was: absent, or the previous complete artifact. Leftover partial
siblings of dead processes are removed the next time the same directory is written.

Single files (reports, caches) go through :func:`atomic_file`: a hidden temporary file in the same
directory, fsynced, then renamed over the target with mode 0644.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llmtrt.exporter.errors import LlmtrtUserError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# Files whose presence says a directory was written by llmtrt (so replacing it loses nothing of the user's).
ARTIFACT_MARKERS = ("manifest.json", "stage.json", "validation.json", "compare.json", "report.json")
_PARTIAL = ".partial-"
_OLD = ".old-"


# --------------------------------------------------------------------------------------------
# hashes
# --------------------------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# single files
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is fsynced, made 0644 and
    renamed over ``path``; when it fails it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomically(path: str | Path, data: bytes | memoryview) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomically(path: str | Path, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def write_json_atomically(path: str | Path, payload: Any) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# artifact directories
# --------------------------------------------------------------------------------------------
def is_llmtrt_dir(directory: Path) -> bool:
    """True for a directory llmtrt wrote (it holds a manifest or report llmtrt names), or an empty one."""
    if not any(directory.iterdir()):
        return True
    return any((directory / m).is_file() for m in ARTIFACT_MARKERS) or any(directory.glob("engine.*.json"))


def check_out_dir(out_dir: str | Path, flag: str = "--out") -> Path:
    """Fail fast, before any heavy work, unless ``out_dir`` can be written as a whole artifact:
    its parent can be created and written, and it is absent, empty, or an llmtrt directory."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LlmtrtUserError(f"{flag} {out}: exists and is a file; give a directory path")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlmtrtUserError(f"{flag} {out}: cannot create {parent} ({exc.strerror}); choose another path") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LlmtrtUserError(f"{flag} {out}: {parent} is not writable; choose another path or fix its permissions")
    if out.is_dir() and not is_llmtrt_dir(out):
        raise LlmtrtUserError(f"{flag} {out}: exists and holds files llmtrt did not write; refusing to replace it "
                              "(choose a new or empty directory)")
    return out


@contextlib.contextmanager
def artifact_dir(out_dir: str | Path, *, carry: Iterable[str] = (), flag: str = "--out") -> Iterator[Path]:
    """Write a whole directory at once: yield a temporary sibling; on success it replaces ``out_dir``.

    ``carry`` names files of the current ``out_dir`` to keep (hard-linked into the new one before the
    stage writes, e.g. a calibration cache); everything else of the old directory goes with it.
    """
    out = check_out_dir(out_dir, flag)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}{_PARTIAL}{os.getpid()}-{secrets.token_hex(3)}"
    tmp.mkdir()
    try:
        for name in carry:
            old = out / name
            if old.is_file():
                try:
                    os.link(old, tmp / name)
                except OSError:
                    shutil.copy2(old, tmp / name)
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o644)
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(new: Path, out: Path) -> None:
    """``new`` becomes ``out``; the previous ``out`` (if any) is removed afterwards."""
    if not out.exists():
        os.rename(new, out)
        return
    if _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # now holds the previous directory
        return
    old = out.parent / f".{out.name}{_OLD}{os.getpid()}-{secrets.token_hex(3)}"
    os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_stale_partials(out: Path) -> None:
    """Remove ``.<name>.partial-<pid>-*`` / ``.old-`` siblings left by processes that no longer run."""
    for sibling in out.parent.glob(f".{out.name}.*-*"):
        rest = sibling.name[len(out.name) + 1:]
        for kind in (_PARTIAL, _OLD):
            if rest.startswith(kind):
                pid = rest[len(kind):].split("-", 1)[0]
                if pid.isdigit() and not _alive(int(pid)):
                    shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
