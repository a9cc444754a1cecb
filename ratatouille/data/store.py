"""The decoded store: a DomainBed folder decoded once per node into one uint8 array.

Layout of ``<cache_dir>/<Dataset>-s<S>-<key>.u8``: a 4096-byte header (a magic line, then JSON:
the key, the item count, S, each domain's first row, the payload's CRC-32) followed by the
payload, a C-order uint8 array ``N x S x S x 3`` (height, width, channel: PIL's own layout)
holding every domain's images in the dataset's sample order, each image the eval transform's
``Resize((S, S))`` of the file. Trials memory-map it read-only: every trial on the node shares
the page cache, and nothing is decoded again. Channels last because the CPU augmentation's
uint8 resize runs on channels-last pixels: an image stored channels first paid a transposing
copy on the way in and out of every resize, which cost as much as the resize itself.

The key hashes the dataset's name, S, the format version and, per item, its path relative to
the dataset folder, its label, its file size and its modification time: a changed folder gets a
new store and never reads a stale one.

One writer: a builder takes an exclusive ``flock`` on ``<file>.lock``, checks again, decodes into
``<file>.tmp-<pid>``, fsyncs and renames it into place; the others wait on the lock, then read.
A file whose size, header or CRC does not match is never read; it is rebuilt. Use a local disk
per node (``flock`` over NFS is not reliable everywhere).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from ratatouille.data.base import DataError, load_rgb

log = logging.getLogger(__name__)

STORE_VERSION = 2  # 2: channels last (1 stored N x 3 x S x S)
HEADER_BYTES = 4096
MAGIC = b"ratatouille-decoded-store\n"
CACHE_ENV = "RATATOUILLE_CACHE_DIR"
_CRC_CHUNK = 64 << 20
_verified: set[tuple[str, int, int]] = set()  # (path, inode, mtime_ns) checked in this process


class StoreError(DataError):
    """A decoded store cannot be built or read (cache folder not writable, bad cache_dir)."""


def default_cache_dir() -> Path:
    """``$RATATOUILLE_CACHE_DIR`` or ``~/.cache/ratatouille/decoded``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ratatouille" / "decoded"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    path = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    if not path.is_absolute():
        raise StoreError(
            f"data.cache_dir must be an absolute path (trials run in other working folders), "
            f"got {str(cache_dir)!r}"
        )
    return path


Samples = Sequence[tuple[str, int]]


def store_key(name: str, root: Path, domains: Sequence[Samples], size: int) -> str:
    digest = hashlib.sha256(f"{STORE_VERSION}\n{name}\n{size}\n".encode())
    for d, samples in enumerate(domains):
        digest.update(f"domain {d} {len(samples)}\n".encode())
        for path, label in samples:
            stat = os.stat(path)
            rel = os.path.relpath(path, root)
            digest.update(f"{rel}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


@dataclass
class DecodedStore:
    """A verified store file; ``images`` memory-maps it read-only on first use (per process)."""

    path: Path
    count: int
    size: int
    offsets: list[int]  # first row of each domain, then count
    _images: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            shape = (self.count, self.size, self.size, 3)
            self._images = np.memmap(self.path, np.uint8, "r", HEADER_BYTES, shape)
        return self._images

    def domain_rows(self, domain: int) -> tuple[int, int]:
        return self.offsets[domain], self.offsets[domain + 1]

    def __getstate__(self) -> dict:  # workers re-map the file instead of copying the pixels
        return {**self.__dict__, "_images": None}


def _payload_bytes(count: int, size: int) -> int:
    return count * 3 * size * size


def _crc(path: Path, nbytes: int) -> int:
    crc = 0
    with open(path, "rb") as handle:
        handle.seek(HEADER_BYTES)
        while nbytes > 0:
            chunk = handle.read(min(_CRC_CHUNK, nbytes))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            nbytes -= len(chunk)
    return crc


def read_store(path: Path, key: str, verify: bool = True) -> DecodedStore | None:
    """The store at ``path`` if it is complete and matches ``key``; None otherwise."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_BYTES)
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    if len(head) != HEADER_BYTES or not head.startswith(MAGIC):
        return None
    try:
        meta = json.loads(head[len(MAGIC) :].rstrip(b"\0 ").decode())
        count, size, offsets = int(meta["count"]), int(meta["size"]), list(meta["offsets"])
        crc, file_key = int(meta["crc32"]), meta["key"]
    except (ValueError, KeyError, TypeError):
        return None
    if file_key != key or stat.st_size != HEADER_BYTES + _payload_bytes(count, size):
        return None
    token = (str(path), stat.st_ino, stat.st_mtime_ns)
    if verify and token not in _verified:
        if _crc(path, _payload_bytes(count, size)) != crc:
            return None
        _verified.add(token)
    return DecodedStore(path, count, size, offsets)


class _Decode(Dataset):
    """Item i: the file's eval-transform resize as an S x S x 3 uint8 tensor."""

    def __init__(self, samples: Samples, size: int) -> None:
        self.samples, self.resize = list(samples), T.Resize((size, size))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.resize(load_rgb(self.samples[index][0]))
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


def _write(tmp: Path, key: str, domains: Sequence[Samples], size: int, workers: int) -> None:
    flat = [item for samples in domains for item in samples]
    offsets = np.cumsum([0] + [len(s) for s in domains]).tolist()
    nbytes = _payload_bytes(len(flat), size)
    with open(tmp, "wb") as handle:
        handle.truncate(HEADER_BYTES + nbytes)
    rows = np.memmap(tmp, np.uint8, "r+", HEADER_BYTES, (len(flat), size, size, 3))
    loader = DataLoader(_Decode(flat, size), batch_size=64, num_workers=workers)
    start = 0
    for batch in loader:
        rows[start : start + len(batch)] = batch.numpy()
        start += len(batch)
    rows.flush()
    del rows
    meta = {"key": key, "count": len(flat), "size": size, "offsets": offsets}
    meta["crc32"] = _crc(tmp, nbytes)
    header = MAGIC + json.dumps(meta).encode()
    if len(header) > HEADER_BYTES:
        raise StoreError(f"store header of {len(header)} bytes exceeds {HEADER_BYTES}")
    with open(tmp, "r+b") as handle:
        handle.write(header.ljust(HEADER_BYTES, b" "))
        handle.flush()
        os.fsync(handle.fileno())


def open_store(
    name: str,
    root: Path,
    domains: Sequence[Samples],
    size: int,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
) -> tuple[DecodedStore, bool]:
    """The decoded store of these domains at S = ``size``, built if missing; ``(store, built)``.

    Concurrent callers on one node wait for a single builder (see the module docstring).
    ``workers`` decode processes build it (default: up to 8 of the machine's cores).
    """
    folder = resolve_cache_dir(cache_dir)
    key = store_key(name, root, domains, size)
    path = folder / f"{name}-s{size}-{key}.u8"
    found = read_store(path, key)
    if found is not None:
        return found, False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(f"{path}.lock", "a+b")  # noqa: SIM115 - held across the build
    except OSError as error:
        raise StoreError(
            f"cannot write the decoded store under {folder} ({error}): set data.cache_dir to a "
            "writable local folder, or data.pipeline: pil"
        ) from None
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        found = read_store(path, key)  # another trial may have built it while we waited
        if found is not None:
            return found, False
        if path.exists():
            log.warning("decoded store %s is incomplete or corrupt: rebuilding it", path)
            path.unlink()
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        count = sum(len(s) for s in domains)
        workers = min(8, os.cpu_count() or 1) if workers is None else workers
        log.info("decoding %d images of %s at %dx%d into %s", count, name, size, size, path)
        try:
            _write(tmp, key, domains, size, workers)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(folder)
        found = read_store(path, key)
        if found is None:
            raise StoreError(f"the decoded store {path} failed its check right after writing")
        return found, True


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
