"""A bundle: a dataset folder, a run's configuration and optional initial weights, sealed in one file.

The owner seals it on a trusted machine (``tempo seal``); the cloud stores it; only code holding the
data key opens it. The manifest (sealed too: file names can be telling) lists every file with its
size and record count in content order, so a reader streams the files back one record (1 MiB) at a
time without ever holding more than that, and knows at once if one is missing.
"""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ConfigError, SealError
from .stream import CHUNK_BYTES, Header, SealedReader, SealedWriter, atomic_output, new_run_id

PURPOSE = "bundle"
WEIGHTS_NAME = "initial_weights.pt"  # where a bundle keeps optional initial weights (outside data/)


@dataclass(frozen=True)
class Entry:
    path: str  # relative, POSIX: "data/train-images-idx3-ubyte.gz" or WEIGHTS_NAME
    size: int
    records: int


def _records(size: int, chunk: int) -> int:
    return -(-size // chunk)


def _data_files(data_dir: Path) -> list[tuple[Path, str]]:
    if not data_dir.is_dir():
        raise ConfigError(f"--data {data_dir} is not a folder")
    files = sorted(p for p in data_dir.rglob("*") if p.is_file())
    if not files:
        raise ConfigError(f"--data {data_dir} holds no files")
    return [(p, "data/" + p.relative_to(data_dir).as_posix()) for p in files]


def seal_bundle(data_dir: Path, config: dict, out: Path, data_key: bytes, *, weights: Path | None = None,
                progress: Callable[[int], None] = lambda n: None, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Seal `data_dir`'s files, `config` (a run's settings as JSON-able values) and `weights` into `out`.

    Written under a temporary name and renamed when complete, so `out` is never a half-written bundle.
    `progress` is called with the plaintext bytes of each record sealed. Returns the bundle's run id.
    """
    sources = _data_files(Path(data_dir))
    if weights is not None:
        if not Path(weights).is_file():
            raise ConfigError(f"--weights {weights} is not a file")
        sources.append((Path(weights), WEIGHTS_NAME))
    entries = [Entry(name, path.stat().st_size, _records(path.stat().st_size, chunk_bytes)) for path, name in sources]
    header = Header(PURPOSE, new_run_id(), chunk_bytes)
    manifest = {"config": config, "files": [vars(e) for e in entries]}
    with atomic_output(out) as f:
        writer = SealedWriter(f, data_key, header, manifest, sum(e.records for e in entries))
        for (path, _), entry in zip(sources, entries, strict=True):
            with path.open("rb") as src:
                for _ in range(entry.records):
                    chunk = src.read(chunk_bytes)
                    if not chunk:
                        raise ConfigError(f"{path} shrank while it was being sealed")
                    writer.write(chunk)
                    progress(len(chunk))
        writer.close()
    return header.run_id


class OpenBundle:
    """A bundle being read: its config and file list at once, the files' bytes as they are streamed."""

    def __init__(self, path: Path, data_key: bytes):
        self.path = Path(path)
        try:
            self._file = self.path.open("rb")
        except OSError as e:
            raise ConfigError(f"cannot open bundle {path}: {e.strerror}") from None
        self._reader = SealedReader(self._file, data_key, name=str(path), purpose=PURPOSE)
        try:
            self.config: dict = self._reader.manifest["config"]
            self.entries = [Entry(str(e["path"]), int(e["size"]), int(e["records"]))
                            for e in self._reader.manifest["files"]]
        except (KeyError, TypeError, ValueError):
            raise SealError(f"{path}: the manifest does not describe a bundle") from None
        if sum(e.records for e in self.entries) != self._reader.records:
            raise SealError(f"{path}: the manifest's files do not add up to its record count")
        for e in self.entries:
            p = PurePosixPath(e.path)
            if p.is_absolute() or ".." in p.parts or not (e.path.startswith("data/") or e.path == WEIGHTS_NAME):
                raise SealError(f"{path}: the manifest names a file outside the bundle: {e.path!r}")

    @property
    def run_id(self) -> str:
        return self._reader.header.run_id

    def files(self) -> Iterator[tuple[Entry, Iterator[bytes]]]:
        """(entry, its authenticated chunks) in order. Chunks a caller leaves unread are skipped (still
        authenticated), so the next file starts at its own first record."""
        records = iter(self._reader)
        for entry in self.entries:
            chunks = itertools.islice(records, entry.records)
            yield entry, chunks
            collections.deque(chunks, maxlen=0)
        next(records, None)  # the stream's end checks: no bytes after the last record

    def extract(self, dest: Path, progress: Callable[[int], None] = lambda n: None) -> None:
        """Write every file under `dest` (data/..., initial weights) and the config as config.json.

        Each file is written under a temporary name and renamed only once all of it authenticated.
        """
        dest = Path(dest)
        for entry, chunks in self.files():
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            size = 0
            try:
                with partial.open("wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
                        size += len(chunk)
                        progress(len(chunk))
                if size != entry.size:
                    raise SealError(f"{self.path}: {entry.path} holds {size} bytes, the manifest says {entry.size}")
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
        (dest / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> OpenBundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
