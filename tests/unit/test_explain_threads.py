"""Issue 13 item 14: two seqfuse.explain calls in two threads each report only their own compile."""
import threading

import torch

import seqfuse

EAGER = {"downstream": "eager"}


def attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v


def fft_conv(u, k):
    L = u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)
    return y[..., :L]


def test_two_threads_get_their_own_reports():
    qkv = [torch.randn(1, 2, 8, 4) for _ in range(3)]
    u, k = torch.randn(2, 4, 32), torch.randn(4, 32)
    jobs = {"attention": (attention, qkv), "long_conv": (fft_conv, [u, k])}
    barrier = threading.Barrier(len(jobs))
    reports, errors = {}, []

    def work(kind):
        fn, args = jobs[kind]
        try:
            barrier.wait(timeout=60)  # both collect at once: one compiles while the other is collecting
            reports[kind] = seqfuse.explain(fn, *args, options=EAGER)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((kind, exc))

    for _ in range(2):  # the two orders in which the compiles may happen
        torch._dynamo.reset()
        threads = [threading.Thread(target=work, args=(kind,)) for kind in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        for kind, report in reports.items():
            assert len(report.graphs) == 1, (kind, str(report))
            assert [r.kind for r in report.rewrites] == [kind], (kind, str(report))
            assert set(report.runtime) == {kind}, (kind, report.runtime)
            assert sum(report.runtime[kind].values()) == 1, (kind, report.runtime)
            assert set(report.fallbacks) <= {kind}, (kind, report.fallbacks)


def test_a_thread_started_inside_explain_does_not_report_into_it():
    """Collection follows the context: a compile in another thread, started while this thread
    collects, is not part of this thread's report."""
    qkv = [torch.randn(1, 2, 8, 4) for _ in range(3)]
    u, k = torch.randn(2, 4, 32), torch.randn(4, 32)
    torch._dynamo.reset()

    def program(*args):
        t = threading.Thread(target=lambda: torch.compile(fft_conv, backend="seqfuse", options=EAGER)(u, k))
        t.start()
        t.join()
        return attention(*args)

    # the thread runs during the call (Dynamo graph-breaks on it); its long_conv compile is not ours
    report = seqfuse.explain(program, *qkv, options=EAGER)
    assert "long_conv" not in [r.kind for r in report.rewrites], str(report)
    assert report.count("attention") == 1, str(report)
