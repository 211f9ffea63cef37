"""clamp2.api in a long-lived process: one model object shared by threads, and warnings said once, not per call."""

import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import DATA_DIR, VECTORS

VECTORS3 = DATA_DIR / "vectors_clamp3"


@pytest.fixture
def fast_switching():
    """Threads switch every 10 µs (default 5 ms), so that two conversions interleave within a few calls."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(previous)


def test_conversions_from_two_threads_equal_serial_ones_and_leave_the_process_streams(fast_switching):
    # abctoolkit's xml2abc writes through a module-global output and every converter redirects the
    # process's stdout/stderr: two threads used to fail each other's MusicXML ("xml2abc failed:
    # AttributeError: 'NoneType' object has no attribute 'add'") and leave sys.stderr/sys.stdout a
    # StringIO for good (every later print and log line lost), and a warnings filter behind.
    from clamp2.extraction.model_inputs import model_text, resolve

    items = [resolve(VECTORS / "inputs/xml/bwv10.7.mxl"), resolve(VECTORS3 / "inputs/xml/bwv26.6.mxl"),
             resolve(VECTORS / "inputs/abc/airds_tune3.abc"), resolve(VECTORS3 / "inputs/abc/banish_misfortune.abc")]
    serial = [model_text(raw) for raw in items]
    streams, filters = (sys.stdout, sys.stderr), list(warnings.filters)

    def convert(start):
        return [(k % len(items), model_text(items[k % len(items)])) for k in range(start, start + 24)]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(convert, (0, 1)))
    assert (sys.stdout, sys.stderr) == streams
    assert list(warnings.filters) == filters
    for result in results:
        for k, text in result:
            assert text == serial[k]


def test_a_cache_that_cannot_be_written_is_said_once_not_per_call(tmp_path, capsys):
    from clamp2 import CLaMP2

    (tmp_path / "features").write_text("a file where the cache's folder should be")
    model = CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=str(VECTORS / "tiny_text_model"),
                                   max_text_length=16, batch_size=4, cache=tmp_path)
    capsys.readouterr()
    for _ in range(3):
        model.encode_music(VECTORS / "inputs/abc/airds_tune3.abc")
    err = capsys.readouterr().err
    assert err.count("cannot write to the feature cache") == 1, err


def test_two_threads_encoding_their_first_audio_load_mert_once(monkeypatch):
    # The first audio file loads MERT (the published one: 95M parameters, seconds); two threads arriving
    # together used to load it twice.
    from clamp2 import CLaMP3
    import clamp2.models.mert as mert_module

    loads = []
    load = mert_module.load_mert

    def counted(*args, **kwargs):
        loads.append(threading.get_ident())
        return load(*args, **kwargs)

    monkeypatch.setattr(mert_module, "load_mert", counted)
    model = CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=str(VECTORS / "tiny_text_model"),
                                   max_text_length=16, mert=VECTORS3 / "tiny_mert")
    together = threading.Barrier(2)

    def first_audio(_):
        together.wait()
        return model.mert_extractor()

    with ThreadPoolExecutor(2) as pool:
        extractors = list(pool.map(first_audio, range(2)))
    assert len(loads) == 1 and extractors[0] is extractors[1]


def test_another_threads_output_during_a_conversion_reaches_its_stream(capsys, fast_switching):
    # contextlib.redirect_stdout/stderr around abctoolkit is process-wide: a service's other threads lost what
    # they printed while a conversion ran (37% of a busy logger's lines). Only the converting thread's is captured.
    from clamp2.extraction.model_inputs import model_text, resolve

    items = [resolve(VECTORS / "inputs/xml/bwv10.7.mxl"), resolve(VECTORS / "inputs/abc/airds_tune3.abc")]
    started, done, written = threading.Event(), threading.Event(), [0]

    def bystander():
        started.set()
        while not done.is_set():
            print(f"heartbeat {written[0]}")
            print(f"alarm {written[0]}", file=sys.stderr)
            written[0] += 1

    thread = threading.Thread(target=bystander)
    thread.start()
    started.wait()
    try:
        for _ in range(4):
            for raw in items:
                model_text(raw)
    finally:
        done.set()
        thread.join()
    out, err = capsys.readouterr()
    assert written[0] > 0
    assert [line for line in out.splitlines() if line.startswith("heartbeat")] == \
        [f"heartbeat {k}" for k in range(written[0])]
    assert [line for line in err.splitlines() if line.startswith("alarm")] == [f"alarm {k}" for k in range(written[0])]


def test_a_process_forked_while_another_thread_converts_can_convert():
    # DataLoader workers of a threaded service are forked at any moment: a child inheriting the converters' lock
    # held by a thread it does not have would wait for it forever.
    import multiprocessing

    from clamp2.convert.captured import one_conversion

    held, release = threading.Event(), threading.Event()

    def holder():
        with one_conversion():
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    try:
        child = multiprocessing.get_context("fork").Process(target=_convert_once)
        child.start()
        child.join(60)
        assert child.exitcode == 0
    finally:
        release.set()
        thread.join()
        if child.is_alive():
            child.kill()


def _convert_once():
    from clamp2.extraction.model_inputs import model_text, resolve

    model_text(resolve(VECTORS / "inputs/abc/airds_tune3.abc"))
