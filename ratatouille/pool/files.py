"""Where a pool's files live: a local folder or a prefix on object storage, through ``pyarrow.fs``.

``pyarrow.fs`` is the filesystem layer Ray Tune already uses for ``storage_path``, so a pool can
sit wherever Tune's results can: ``s3://bucket/pool`` (credentials, region and endpoint from the
standard ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` included, or from the
URI's query, e.g. ``?endpoint_override=host:port&scheme=http``), ``gs://...``, or a local path.
Reads take the same path for both. Writes differ only where their guarantees come from:

* a local folder (or a shared mount) writes a temp file, fsyncs it and ``os.replace``s it, and
  serialises manifest updates with ``flock``: concurrent writers never lose an entry and a reader
  never sees half a file;
* object storage has neither rename nor lock, but one PUT (a completed multipart upload too) is
  atomic and S3 reads after it are strongly consistent: a reader sees the whole old object or the
  whole new one. What it cannot do is serialise two writers' read-modify-write of the manifest,
  so a pool on object storage has **one writer at a time**: the driver of a run (the pool, like
  MLflow, is written from the driver only) or one ``ratatouille pool import``. Readers may be many.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from ratatouille.core.errors import UserError

_LOCK = ".manifest.lock"


class PoolError(UserError, ValueError):
    """A pool problem, stated as what is wrong and what to do about it."""


def is_uri(location: str | Path) -> bool:
    return isinstance(location, str) and "://" in location


def child_location(location: str, name: str) -> str:
    """``location/name``; a URI keeps its query (``?endpoint_override=...``) at the end."""
    if not is_uri(location):
        return str(Path(location) / name)
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


def sibling_location(location: str, name: str) -> str:
    """The folder ``name`` beside ``location`` (phi_pt's pool beside the auxiliary pool)."""
    if not is_uri(location):
        return str(Path(location).parent / name)
    parts = urlsplit(location)
    parent = parts.path.rstrip("/").rsplit("/", 1)[0]
    return urlunsplit(parts._replace(path=f"{parent}/{name}"))


class PoolFiles:
    """The files of one pool folder, by name; ``location`` is what messages show."""

    def __init__(self, location: str | Path) -> None:
        self.local = not is_uri(location)
        if self.local:
            self.location = str(Path(location).expanduser().absolute())
            self._fs, self._base = pafs.LocalFileSystem(), self.location
        else:
            self.location = str(location).rstrip("/")
            self._fs, self._base = _from_uri(self.location)

    def show(self, name: str) -> str:
        return child_location(self.location, name)

    def _path(self, name: str) -> str:
        return f"{self._base.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        with self._reaching():
            return bool(self._fs.get_file_info(self._path(name)).type == pafs.FileType.File)

    def read(self, name: str) -> bytes:
        """The file's bytes; FileNotFoundError when it is not there."""
        with self._reaching(), self._fs.open_input_stream(self._path(name)) as stream:
            return bytes(stream.readall())

    def write(self, name: str, payload: bytes) -> None:
        """Replace the file ``name`` as a whole: readers see the old bytes or the new ones."""
        if self.local:
            _write_local(Path(self._base), name, payload)
            return
        with self._reaching(), self._fs.open_output_stream(self._path(name)) as stream:
            stream.write(payload)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Serialise manifest updates: flock on a local folder (and on shared filesystems that
        honour it); nothing on object storage, whose rule is one writer at a time."""
        if not self.local:
            yield
            return
        Path(self._base).mkdir(parents=True, exist_ok=True)
        with open(Path(self._base) / _LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """A store that cannot be reached (no bucket, no credentials, wrong endpoint) is a
        PoolError that says where; a missing file stays FileNotFoundError for the caller."""
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as err:
            if self.local:
                raise
            raise PoolError(
                f"cannot reach pool {self.location} ({str(err).splitlines()[0]}); check the "
                "bucket, the credentials and the endpoint (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)"
            ) from err


def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:  # ArrowInvalid: unknown scheme or malformed URI
        raise PoolError(
            f"pool location {uri!r} is not a filesystem pyarrow can open ({err}); use a local "
            "folder or a URI such as s3://bucket/pool"
        ) from err


def _write_local(folder: Path, name: str, payload: bytes) -> None:
    """Temp file in ``folder`` (same filesystem), fsync, then ``os.replace``: atomic and durable."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, folder / name)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
