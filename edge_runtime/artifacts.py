"""Content-addressed artifact store with atomic installs and chunked downloads.

Layout under the store root::

    objects/<sha256>        complete, verified program files (never modified in place)
    partial/<sha256>.part   a download in progress, written at chunk offsets
    partial/<sha256>.chunks the chunks written so far and their hashes (for resuming)
    damaged/<sha256>.<n>    objects whose bytes no longer match their name, moved aside

An object is trusted only once its bytes were hashed again (:meth:`ArtifactStore.verify`,
:meth:`ArtifactStore.read`); one that fails is moved aside at once, so the next look finds
it missing and it is fetched again.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import time
from pathlib import Path

from eclm_wire import ArtifactRef
from edge_runtime.errors import ArtifactError, DamagedArtifact, HashMismatch

log = logging.getLogger(__name__)
DAMAGED_KEPT = 8  # damaged objects kept for a look; older ones are deleted


class Check(enum.Enum):
    """What re-hashing a stored object found."""

    GOOD = "good"
    MISSING = "missing"
    DAMAGED = "damaged"  # and moved aside


class Arrival(enum.Enum):
    """What a chunk that arrives does to a download."""

    NEW = "new"
    DUPLICATE = "duplicate"  # the same bytes again (a re-sent request, a cut)
    CONFLICT = "conflict"  # other bytes than those held: one of the two lies


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.
    ``sync=False`` skips both fsyncs: readers still see the old or the new file whole, a
    killed process loses nothing, but a power cut may leave the old one (or an empty one,
    on filesystems that do not order a rename after its data): for copies only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if sync:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """Program files named by their sha256."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "partial").mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256

    def has(self, sha256: str) -> bool:
        """Whether an object by that name is held (its bytes not checked: see verify)."""
        return self.path(sha256).is_file()

    def verify(self, sha256: str) -> Check:
        """Hash the object again; one whose bytes do not match is moved aside."""
        try:
            actual = sha256_file(self.path(sha256))
        except FileNotFoundError:
            return Check.MISSING
        if actual == sha256:
            return Check.GOOD
        self.set_aside(sha256)
        return Check.DAMAGED

    def scrub(self) -> list[str]:
        """Verify every object held; return the names of those found damaged (moved aside)."""
        return [sha for sha in sorted(self.names()) if self.verify(sha) is Check.DAMAGED]

    def set_aside(self, sha256: str) -> Path | None:
        """Move a damaged object to ``damaged/`` (keeping the latest few for a look)."""
        aside = self.root / "damaged"
        aside.mkdir(exist_ok=True)
        kept = sorted(aside.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in kept[: max(0, len(kept) - DAMAGED_KEPT + 1)]:
            old.unlink(missing_ok=True)
        target = aside / f"{sha256}.{time.time_ns()}"
        try:
            os.replace(self.path(sha256), target)
        except FileNotFoundError:
            return None
        log.error("artifact %s is damaged on disk: moved to %s", sha256[:12], target)
        return target

    def put(self, data: bytes) -> str:
        """Store ``data``; return its sha256. Storing the same bytes again is a no-op."""
        sha = sha256_bytes(data)
        if not self.has(sha):
            atomic_write(self.path(sha), data)
        return sha

    def read(self, sha256: str) -> bytes:
        """The bytes of an artifact, re-hashed; ArtifactError if missing, DamagedArtifact
        (after moving it aside) if its bytes do not match."""
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"artifact {sha256[:12]} is not in the store") from None
        if sha256_bytes(data) != sha256:
            self.set_aside(sha256)
            raise DamagedArtifact(sha256)
        return data

    def names(self) -> set[str]:
        """The sha256 of every complete artifact held."""
        return {path.name for path in (self.root / "objects").iterdir()}

    def prune(self, keep: set[str]) -> list[str]:
        """Delete every complete artifact not named in ``keep`` (partial downloads stay, to
        be resumed); return the names deleted."""
        removed = sorted(self.names() - keep)
        for name in removed:
            self.path(name).unlink(missing_ok=True)
        return removed

    def read_chunk(self, sha256: str, index: int, chunk_size: int) -> bytes:
        """Chunk ``index`` of an artifact, read without hashing the whole file (the device
        checks each chunk's hash and the whole file's); empty past the end."""
        try:
            with open(self.path(sha256), "rb") as fh:
                fh.seek(index * chunk_size)
                return fh.read(chunk_size)
        except FileNotFoundError:
            raise ArtifactError(f"artifact {sha256[:12]} is not in the store") from None

    def download(self, ref: ArtifactRef) -> Download:
        """Start or resume the chunked download of ``ref``."""
        return Download(self, ref)


class Download:
    """Chunks of one artifact arriving in any order, written at their offsets.

    Each chunk written is recorded with its hash in a journal beside the partial file, so
    a download interrupted by a restart resumes with the chunks whose bytes still match.
    A whole file that fails its hash keeps its chunks until :meth:`drop` says which to
    fetch again (the chunk topic carries no proof of origin: see :mod:`download`).
    """

    def __init__(self, store: ArtifactStore, ref: ArtifactRef) -> None:
        self.store = store
        self.ref = ref
        self.part = store.root / "partial" / f"{ref.sha256}.part"
        self.journal = store.root / "partial" / f"{ref.sha256}.chunks"
        self.digests: dict[int, str] = self._resume()

    @property
    def received(self) -> set[int]:
        return set(self.digests)

    def _expected_size(self, index: int) -> int:
        return min(self.ref.chunk_size, self.ref.size - index * self.ref.chunk_size)

    def _resume(self) -> dict[int, str]:
        try:
            # ASCII with replacement: a damaged journal is skipped line by line, not fatal
            entries = self.journal.read_bytes().decode("ascii", "replace").split()
            fh = open(self.part, "rb")
        except FileNotFoundError:
            return {}
        held = {}
        with fh:
            for entry in entries:
                index, _, digest = entry.partition(":")
                if not index.isdigit() or len(index) > 18 or int(index) >= self.ref.chunk_count:
                    continue  # a torn last line, or damage
                fh.seek(int(index) * self.ref.chunk_size)
                if sha256_bytes(fh.read(self._expected_size(int(index)))) == digest:
                    held[int(index)] = digest
        return held

    @property
    def complete(self) -> bool:
        return len(self.digests) == self.ref.chunk_count

    def missing(self) -> list[int]:
        return [i for i in range(self.ref.chunk_count) if i not in self.digests]

    def add(self, index: int, data: bytes) -> Arrival:
        """Write chunk ``index`` unless it is held; ArtifactError if it lies outside the
        declared size."""
        ref = self.ref
        if not 0 <= index < ref.chunk_count:
            raise ArtifactError(f"chunk {index} is outside 0..{ref.chunk_count - 1}")
        want = self._expected_size(index)
        if len(data) != want:
            raise ArtifactError(f"chunk {index} has {len(data)} bytes, expected {want}")
        digest = sha256_bytes(data)
        if index in self.digests:
            return Arrival.DUPLICATE if self.digests[index] == digest else Arrival.CONFLICT
        # No fsync per chunk (slow on SD cards): after a crash, _resume keeps only the
        # chunks whose bytes on disk match their journal entry, and finish() syncs the file.
        mode = "r+b" if self.part.exists() else "wb"
        with open(self.part, mode) as fh:
            fh.seek(index * ref.chunk_size)
            fh.write(data)
        with open(self.journal, "a") as fh:
            fh.write(f"{index}:{digest}\n")
        self.digests[index] = digest
        return Arrival.NEW

    def drop(self, indices: set[int] | None = None) -> int:
        """Forget the chunks ``indices`` (None: all), to fetch them again; return how many."""
        gone = set(self.digests) if indices is None else set(self.digests) & indices
        for index in gone:
            del self.digests[index]
        lines = "".join(f"{i}:{d}\n" for i, d in sorted(self.digests.items()))
        if self.digests:
            atomic_write(self.journal, lines.encode())
        else:
            self.journal.unlink(missing_ok=True)
            self.part.unlink(missing_ok=True)
        return len(gone)

    def finish(self) -> Path:
        """Verify the whole file's hash and move it into the store; HashMismatch (chunks
        kept, see :meth:`drop`) if it does not match."""
        if not self.complete:
            raise ArtifactError(f"download incomplete: missing chunks {self.missing()[:10]}")
        with open(self.part, "r+b") as fh:
            fh.truncate(self.ref.size)
            fh.flush()
            os.fsync(fh.fileno())
        actual = sha256_file(self.part)
        if actual != self.ref.sha256:
            raise HashMismatch(
                f"artifact {self.ref.name}: sha256 {actual[:12]} does not match "
                f"declared {self.ref.sha256[:12]}"
            )
        self.journal.unlink(missing_ok=True)
        target = self.store.path(self.ref.sha256)
        os.replace(self.part, target)
        _fsync_dir(target.parent)
        return target
