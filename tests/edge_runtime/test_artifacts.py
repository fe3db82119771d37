import pytest

import eclm_wire as wire
from edge_runtime.artifacts import ArtifactStore, sha256_bytes
from edge_runtime.errors import ArtifactError

DATA = (bytes(range(256)) * 20)[:5000]  # five 1 KiB chunks, the last one short


def ref(data=DATA, sha=None):
    return wire.ArtifactRef(
        name="a", sha256=sha or sha256_bytes(data), size=len(data), format="pte", chunk_size=1024
    )


def chunks(data=DATA):
    return [data[i : i + 1024] for i in range(0, len(data), 1024)]


def test_chunks_in_any_order_assemble_into_the_verified_file(tmp_path):
    store = ArtifactStore(tmp_path)
    download = store.download(ref())

    for index in (3, 0, 4, 1, 2):
        download.add(index, chunks()[index])
    path = download.finish()

    assert path.read_bytes() == DATA and store.read(ref().sha256) == DATA
    assert not list((tmp_path / "partial").iterdir())


def test_a_wrong_whole_file_hash_is_refused_and_nothing_is_installed(tmp_path):
    store = ArtifactStore(tmp_path)
    download = store.download(ref(sha="0" * 64))
    for index, chunk in enumerate(chunks()):
        download.add(index, chunk)

    with pytest.raises(ArtifactError, match="does not match"):
        download.finish()
    assert not store.has("0" * 64)


@pytest.mark.parametrize(
    ("index", "data"), [(5, b"x" * 1024), (-1, b"x" * 1024), (0, b"x" * 1025), (4, b"x" * 1024)]
)
def test_chunks_outside_the_declared_size_are_refused(tmp_path, index, data):
    download = ArtifactStore(tmp_path).download(ref())

    with pytest.raises(ArtifactError):
        download.add(index, data)


def test_an_incomplete_download_cannot_finish(tmp_path):
    download = ArtifactStore(tmp_path).download(ref())
    download.add(0, chunks()[0])

    with pytest.raises(ArtifactError, match="missing chunks \\[1, 2, 3, 4\\]"):
        download.finish()


def test_corruption_on_disk_is_detected_on_read(tmp_path):
    store = ArtifactStore(tmp_path)
    sha = store.put(DATA)
    store.path(sha).write_bytes(DATA[:-1] + b"!")

    with pytest.raises(ArtifactError, match="corrupt"):
        store.read(sha)
    with pytest.raises(ArtifactError, match="not in the store"):
        store.read("1" * 64)


def test_an_interrupted_download_resumes_with_the_chunks_whose_bytes_still_match(tmp_path):
    first = ArtifactStore(tmp_path).download(ref())
    for index in (0, 1, 2):
        first.add(index, chunks()[index])
    part = bytearray(first.part.read_bytes())
    part[1024 + 7] ^= 0xFF  # chunk 1 damaged on disk after it was written
    first.part.write_bytes(bytes(part))
    with open(first.journal, "a") as fh:
        fh.write("3:deadb")  # a line torn by the crash

    resumed = ArtifactStore(tmp_path).download(ref())  # a restarted agent

    assert resumed.missing() == [1, 3, 4]
    for index in resumed.missing():
        resumed.add(index, chunks()[index])
    assert resumed.finish().read_bytes() == DATA
    assert not list((tmp_path / "partial").iterdir())


def test_a_chunk_is_checked_against_its_own_hash():
    payload = wire.pack_chunk(b"abc" * 100)

    assert wire.unpack_chunk(payload) == b"abc" * 100
    for bad in (payload[:-1], payload[:20], b"", payload[:40] + b"!" + payload[41:]):
        with pytest.raises(wire.ProtocolError) as info:
            wire.unpack_chunk(bad)
        assert info.value.code == "chunk-hash"
