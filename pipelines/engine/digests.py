"""The sha256 of an ONNX graph with its external weights, each weights file read once per build,
in the background while TensorRT builds.

Same value as ``artifacts.onnx_sha256`` (sha256 over the graph file's sha256 and each external-data
file's sha256, in name order). A build hashes two graphs that share one weights file: the export it
checks and the lowered graph it builds, whose weights are a hard link (or symlink) to the same
file. ``Digests`` remembers each file's sha256 by inode, so the 4.4 GB of a 1.1B fp32 export are read
once, not twice (16 s each on the 2-core build machine), and ``later`` hashes on a thread while the
builder runs (TensorRT releases the GIL while it builds: measured).
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future
from pathlib import Path

import onnx

from llmtrt.pipelines.artifacts import external_data_files

CHUNK = 1 << 22


class Cancelled(Exception):
    """Hashing was stopped because the build it belonged to failed."""


class Digests:
    """sha256 of files, each read once (keyed by device, inode, size and mtime, so hard links and
    symlinks count once); computations in flight are shared, and ``cancel`` stops them."""

    def __init__(self) -> None:
        self._files: dict[tuple[int, int, int, int], Future[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def file(self, path: Path) -> str:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            future, mine = self._files.get(key), False
            if future is None:
                future, mine = Future(), True
                self._files[key] = future
        if mine:
            try:
                future.set_result(self._sha256(path))
            except BaseException as exc:
                future.set_exception(exc)
        return future.result()

    def onnx(self, onnx_path: str | Path, model: onnx.ModelProto | None = None) -> str:
        """The ONNX file's sha256 including its external weights (``artifacts.onnx_sha256``'s value).
        ``model`` may be ``weightless_model``'s view: references to the file's own inline bytes are
        part of the file's hash already."""
        onnx_path = Path(onnx_path)
        if model is None:
            model = onnx.load(str(onnx_path), load_external_data=False)
        h = hashlib.sha256(self.file(onnx_path).encode())
        for location in external_data_files(model):
            data = onnx_path.parent / location
            if data.is_file() and location != onnx_path.name:
                h.update(self.file(data).encode())
        return h.hexdigest()

    def later(self, onnx_path: str | Path, model: onnx.ModelProto | None = None) -> Future[str]:
        """``onnx`` computed on a daemon thread; ``.result()`` waits for it."""
        future: Future[str] = Future()

        def work() -> None:
            try:
                future.set_result(self.onnx(onnx_path, model))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=work, name="llmtrt-sha256", daemon=True).start()
        return future

    def cancel(self) -> None:
        """Stop every hash in flight (they raise Cancelled)."""
        self._stop.set()

    def _sha256(self, path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                if self._stop.is_set():
                    raise Cancelled(str(path))
                h.update(block)
        return h.hexdigest()
