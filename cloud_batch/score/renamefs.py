"""A local pyarrow filesystem whose written files appear only complete: for Ray's ``write_parquet``.

``open_output_stream(path)`` writes a hidden temp file beside ``path`` and renames it into place when
the stream is closed after a complete write, so a worker killed mid-write leaves a ``.``-file that
a rerun deletes, never a torn partition. Everything else is the local filesystem. Picklable (Ray
ships it to the scoring actors).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs


class _RenameOnClose:
    """A binary file object that becomes ``target`` on a clean ``close``."""

    def __init__(self, target: str) -> None:
        fd, self.tmp = tempfile.mkstemp(prefix=f".{Path(target).name}.", suffix=".tmp", dir=Path(target).parent)
        self.fh = os.fdopen(fd, "wb")
        self.target = target
        self.closed = False

    def write(self, data: Any) -> int:
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()

    def tell(self) -> int:
        return self.fh.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.fh.close()
            os.replace(self.tmp, self.target)


class RenameOnCloseHandler(pafs.FileSystemHandler):
    """``pyarrow.fs.LocalFileSystem`` with rename-on-close output streams."""

    def __init__(self) -> None:
        self.local = pafs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RenameOnCloseHandler)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __reduce__(self) -> tuple[Any, ...]:
        return (RenameOnCloseHandler, ())

    def get_type_name(self) -> str:
        return "edgefleet-rename-on-close"

    def normalize_path(self, path: str) -> str:
        return str(self.local.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return list(self.local.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return list(self.local.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the root directory's contents")

    def delete_file(self, path: str) -> None:
        self.local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.local.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.local.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.local.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None = None) -> pa.NativeFile:
        return pa.PythonFile(_RenameOnClose(path), mode="w")

    def open_append_stream(self, path: str, metadata: dict[str, str] | None = None) -> pa.NativeFile:
        raise OSError("append is not supported: partitions are written whole")


def rename_on_close_fs() -> pafs.PyFileSystem:
    """The filesystem to hand to ``write_parquet``."""
    return pafs.PyFileSystem(RenameOnCloseHandler())
