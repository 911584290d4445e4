"""The request book's preemption: evict the newest sequence on a full device, or wait for
it if it is in flight; never an older idle one in its place. And the token ids a step
reads of a request."""

from hypothesis import given
from hypothesis import strategies as st

from moeflow.ops.sampling import SamplingParams
from moeflow.scheduler import Cluster, FineEP
from moeflow.sim import models
from moeflow.scheduler.requests import RequestBook
from moeflow.serve.engine import Request

BLOCK = 4


def book_with_two_decoding() -> tuple[RequestBook, dict[int, object]]:
    """Sequences 0 (older) and 1 (newer) on cpu:0, each with a full block of 4 tokens
    computed and one sampled token pending: each needs a new block, and 1 is free."""
    spec = models.load("olmoe-1b-7b")
    cluster = Cluster.sharded(("cpu:0",), spec.moe.num_experts)
    book = RequestBook(FineEP(), spec, cluster, {"cpu:0": 3}, BLOCK, max_batch_tokens=64)
    for seq_id in (0, 1):
        book.add(seq_id, BLOCK, 8, 0.0)
    jobs = {j.unit.seqs[0].seq_id: j for j in book.schedule()}
    assert sorted(jobs) == [0, 1]
    return book, jobs


def test_an_idle_older_sequence_waits_for_the_newer_one_in_flight():
    book, jobs = book_with_two_decoding()
    book.complete(jobs[0])
    book.add_output(0)
    [job] = book.schedule()  # 0 takes the free block
    assert job.unit.seqs[0].seq_id == 0
    book.complete(jobs[1])
    book.add_output(1)
    book.complete(job)
    book.add_output(0)
    # 0 computed 5 tokens (room in its block); 1 needs a block and none is free: 1 is the
    # newest and idle, so it is evicted
    book.schedule()
    assert book.seqs[1].num_preemptions == 1 and book.seqs[0].num_preemptions == 0


def test_the_newest_in_flight_is_waited_for_not_replaced():
    book, jobs = book_with_two_decoding()
    book.complete(jobs[1])
    book.add_output(1)
    [job] = book.schedule()  # the newer sequence 1 takes the free block and is in flight
    assert job.unit.seqs[0].seq_id == 1
    book.complete(jobs[0])
    book.add_output(0)
    # 0 (older, idle) needs a block, none is free, and the newest (1) is in flight: wait
    assert book.schedule() == []
    assert book.seqs[0].num_preemptions == 0 and book.seqs[1].num_preemptions == 0
    book.complete(job)
    book.add_output(1)
    book.schedule()  # now 1 is idle: it is the one evicted
    assert book.seqs[1].num_preemptions == 1 and book.seqs[0].num_preemptions == 0


@given(st.lists(st.integers(0, 99), max_size=12), st.lists(st.integers(0, 99), max_size=12),
       st.data())
def test_a_requests_ids_are_its_prompt_and_output_read_together(prompt, output, data):
    req = Request(1, prompt, SamplingParams(), 0.0, output_ids=output)
    joined = prompt + output
    start = data.draw(st.integers(0, len(joined)))
    end = data.draw(st.integers(start, len(joined)))
    assert req.ids(start, end) == joined[start:end] and req.num_ids == len(joined)


def test_a_sequence_alone_that_outgrows_its_device_ends_instead_of_evicting_itself():
    """Evicted, a sequence alone on its device would be readmitted to the same wall for
    ever (it once spun so, blocking every other request): it ends, KV_FULL."""
    from moeflow.scheduler.requests import KV_FULL, SeqStatus

    spec = models.load("olmoe-1b-7b")
    cluster = Cluster.sharded(("cpu:0",), spec.moe.num_experts)
    book = RequestBook(FineEP(), spec, cluster, {"cpu:0": 2}, BLOCK, max_batch_tokens=64)
    assert book.kv_tokens == 2 * BLOCK
    book.add(0, 6, 8, 0.0)  # 6 + 8 tokens: past the 8 the device holds
    for _ in range(20):
        jobs = book.schedule()
        if book.kv_full:
            break
        for job in jobs:
            book.complete(job)
            book.add_output(0)
    assert book.kv_full == [0] and book.seqs[0].status is SeqStatus.FINISHED
    assert book.seqs[0].finish_reason == KV_FULL and book.seqs[0].num_preemptions == 0
    assert book.free_kv_blocks() == {"cpu:0": 2} and not book.has_unfinished()


def test_a_job_that_failed_for_no_fault_of_its_own_requeues_or_ends_its_sequences():
    """`requeue`: the sequences asked to run again wait first in line, their KV released
    and their computed tokens forgotten (they are recomputed); the others end."""
    from moeflow.scheduler.requests import SeqStatus

    book, jobs = book_with_two_decoding()
    assert book.kv_used["cpu:0"] == 2
    done = book.requeue(jobs[1], {1}, "error: actor cpu:0 died")
    seq = book.seqs[1]
    assert seq.status is SeqStatus.WAITING and seq.num_computed == 0 and not seq.in_flight
    assert seq.num_preemptions == 1 and book.waiting[0] == 1
    assert book.evicted == [("cpu:0", 1)] and done.released == [] and done.sampled == []
    assert book.kv_used["cpu:0"] == 1
    done = book.requeue(jobs[0], set(), "error: actor cpu:0 died")
    assert book.seqs[0].status is SeqStatus.FINISHED
    assert book.seqs[0].finish_reason == "error: actor cpu:0 died"
    assert done.released == [("cpu:0", 0)] and book.kv_used["cpu:0"] == 0
    [job] = book.schedule()  # the requeued one is admitted again, from its first token
    assert job.unit.seqs[0].seq_id == 1 and job.unit.seqs[0].start == 0
