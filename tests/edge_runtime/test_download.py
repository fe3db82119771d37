"""The chunk-download state machine on a real store, with an injected clock: a window of
requests, stalls asked again, and poisoned files dropped and fetched again with backoff."""

import pytest

import eclm_wire as wire
from eclm_wire import EventCode
from edge_runtime.artifacts import ArtifactStore, sha256_bytes
from edge_runtime.download import RetryPolicy, Transfer, TransferState
from edge_runtime.errors import ArtifactError

DATA = bytes(range(256)) * 16  # four 1 KiB chunks
OTHER = bytes(reversed(DATA))
TRUE = {sha256_bytes(DATA): DATA, sha256_bytes(OTHER): OTHER}


def ref(data: bytes = DATA, name: str = "a") -> wire.ArtifactRef:
    return wire.ArtifactRef(
        name=name, sha256=sha256_bytes(data), size=len(data), format="tflite", chunk_size=1024
    )


def chunk(data: bytes, index: int) -> bytes:
    return data[index * 1024 : (index + 1) * 1024]


class Link:
    """Records the transfer's requests and events; time moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0
        self.requests: list[tuple[str, int]] = []
        self.events: list[tuple[EventCode, str]] = []

    def transfer(self, store, refs, **options) -> Transfer:
        return Transfer(
            store,
            refs,
            request=lambda sha, i: self.requests.append((sha, i)),
            event=lambda code, reason: self.events.append((code, reason)),
            clock=lambda: self.now,
            **options,
        )

    def answer(self, transfer: Transfer, *, poison: set[int] = frozenset()) -> None:
        """Answer every request so far, with lies for the indices in ``poison``."""
        while self.requests:
            sha, index = self.requests.pop(0)
            data = TRUE[sha]
            body = chunk(bytes(reversed(data)) if index in poison else data, index)
            transfer.on_chunk(sha, index, body)


def test_two_files_arrive_through_a_window_of_two_requests(tmp_path):
    store, link = ArtifactStore(tmp_path), Link()
    transfer = link.transfer(store, [ref(), ref(OTHER, "b")], window=2)

    transfer.start()
    assert [i for _, i in link.requests] == [0, 1]  # never more than the window
    while link.requests:
        link.answer(transfer)

    assert store.read(ref().sha256) == DATA and store.read(ref(OTHER).sha256) == OTHER
    assert link.events == [] and transfer.failed_attempts == 0


def test_a_stalled_link_is_asked_again_after_the_timeout(tmp_path):
    link = Link()
    transfer = link.transfer(ArtifactStore(tmp_path), [ref()], timeout=5.0)
    transfer.start()
    link.requests.clear()  # lost on the way

    link.now = 4.0
    transfer.poll()
    assert link.requests == []
    link.now = 5.5
    transfer.poll()

    assert [i for _, i in link.requests] == [0, 1]


def test_a_poisoned_chunk_is_dropped_and_fetched_again_after_a_backoff(tmp_path):
    store, link = ArtifactStore(tmp_path), Link()
    retry = RetryPolicy(budget=3, backoff=1.0, max_backoff=4.0)
    transfer = link.transfer(store, [ref()], window=4, retry=retry)
    transfer.start()

    link.answer(transfer, poison={2})  # self-consistent, but wrong

    assert transfer.state is TransferState.WAITING
    assert [c for c, _ in link.events] == [EventCode.TRANSFER_RETRY]
    assert "attempt 1: dropped 4 of 4 chunks, asking again in 1 s" in link.events[0][1]
    transfer.on_chunk(ref().sha256, 3, chunk(DATA, 3))  # nothing new while backing off
    assert transfer.current.received == set()
    link.now = 1.0
    transfer.poll()
    link.answer(transfer)

    assert transfer.done and store.read(ref().sha256) == DATA


def test_a_contradicted_chunk_is_the_only_one_dropped(tmp_path):
    store, link = ArtifactStore(tmp_path), Link()
    transfer = link.transfer(store, [ref()], window=4)
    transfer.start()
    requests = list(link.requests)
    transfer.on_chunk(ref().sha256, 1, chunk(OTHER, 1))  # the lie comes first ...
    transfer.on_chunk(ref().sha256, 1, chunk(DATA, 1))  # ... the truth contradicts it
    for sha, index in requests:
        if index != 1:
            transfer.on_chunk(sha, index, chunk(DATA, index))

    assert "dropped 1 of 4 chunks" in link.events[0][1]
    link.now = 10.0
    link.requests.clear()
    transfer.poll()
    assert [i for _, i in link.requests] == [1]
    link.answer(transfer)
    assert transfer.done


def test_fifty_poisoned_attempts_in_a_row_do_not_stop_the_transfer(tmp_path):
    store, link = ArtifactStore(tmp_path), Link()
    retry = RetryPolicy(budget=5, backoff=0.5, max_backoff=8.0)
    transfer = link.transfer(store, [ref()], window=2, retry=retry)
    transfer.start()
    delays = []
    for _ in range(50):
        link.answer(transfer, poison={0})
        assert transfer.state is TransferState.WAITING
        delays.append(transfer._resume_at - link.now)
        link.now = transfer._resume_at
        transfer.poll()
    link.answer(transfer)

    codes = [c for c, _ in link.events]
    assert codes.count(EventCode.TRANSFER_RETRY) == 50
    assert codes.count(EventCode.TRANSFER_FAILING) == 1  # once, when the budget is spent
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0] and set(delays[6:]) == {8.0}
    assert store.read(ref().sha256) == DATA


def test_a_resumed_download_that_holds_every_chunk_finishes_at_start(tmp_path):
    store, link = ArtifactStore(tmp_path), Link()
    partial = store.download(ref())
    for index in range(4):
        partial.add(index, chunk(DATA, index))

    transfer = link.transfer(store, [ref()])
    transfer.start()

    assert transfer.done and link.requests == [] and store.read(ref().sha256) == DATA


def test_a_download_cut_by_a_restart_resumes_from_its_journal_asking_only_what_it_lacks(
    tmp_path,
):
    link = Link()
    before = link.transfer(ArtifactStore(tmp_path), [ref()], window=2)
    before.start()
    for sha, index in [link.requests.pop(0), link.requests.pop(0)]:
        before.on_chunk(sha, index, chunk(DATA, index))  # 0 and 1; a restart cuts 2 and 3
    link.requests.clear()
    damaged = tmp_path / "partial" / f"{ref().sha256}.part"
    with open(damaged, "r+b") as fh:  # chunk 1 torn on disk by the cut
        fh.seek(1024)
        fh.write(b"\0" * 16)

    store = ArtifactStore(tmp_path)  # the restarted device
    after = link.transfer(store, [ref()], window=4)
    after.start()

    assert sorted(i for _, i in link.requests) == [1, 2, 3]
    link.answer(after)
    assert after.done and store.read(ref().sha256) == DATA
    assert not damaged.exists()


def test_duplicates_are_counted_and_chunks_not_awaited_or_out_of_shape_are_refused(tmp_path):
    link = Link()
    transfer = link.transfer(ArtifactStore(tmp_path), [ref()], window=1)
    transfer.start()
    sha = ref().sha256

    assert transfer.on_chunk(sha, 0, chunk(DATA, 0))
    assert transfer.on_chunk(sha, 0, chunk(DATA, 0))  # again, after a cut
    assert not transfer.on_chunk(ref(OTHER).sha256, 1, chunk(OTHER, 1))  # another file
    with pytest.raises(ArtifactError, match="expected 1024"):
        transfer.on_chunk(sha, 1, chunk(DATA, 1)[:100])
    with pytest.raises(ArtifactError, match="outside 0..3"):
        transfer.on_chunk(sha, 4, chunk(DATA, 0))

    assert transfer.duplicates == 1 and transfer.current.received == {0}
    assert link.events == [] and not transfer.done


@pytest.mark.parametrize(
    "policy", [dict(budget=0), dict(backoff=-1.0), dict(backoff=5.0, max_backoff=1.0)]
)
def test_a_retry_policy_out_of_range_is_refused(policy):
    with pytest.raises(ValueError, match="retry"):
        RetryPolicy(**policy)
