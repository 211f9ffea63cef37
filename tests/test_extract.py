"""Feature extraction (SPEC §8): the reference's numbers, independence from batching, bad inputs."""

import io
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import clamp2
from clamp2.extraction.core import (combine_global, combine_positions, plan_batches, text_lines, window_starts,
                                    window_weights)
from clamp2.extraction.core import MusicEncoder, read_text_file
from clamp2.patchilizer import M3Patchilizer
from conftest import FP32_FLAGS, TINY_ENV, free_port, precision_flags, workers_outliving_a_kill



def clamp2_args(vectors, inp, out, *extra):
    return [str(inp), str(out), "--weights", str(vectors / "tiny_clamp2.pth"),
            "--text_model", str(vectors / "tiny_text_model"), "--num_workers", "0", "--no_progress", *extra]


def compare_tree(expected_root, got_root):
    files = sorted(expected_root.rglob("*.npy"))
    assert files
    for ref in files:
        rel = ref.relative_to(expected_root)
        got = np.load(got_root / rel)
        want = np.load(ref)
        assert got.dtype == np.float32 and got.shape == want.shape, rel
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(rel))
    assert sorted(p.relative_to(got_root) for p in got_root.rglob("*.npy")) == [p.relative_to(expected_root) for p in files]


@pytest.mark.parametrize("normalize,expected", [(True, "feat_clamp2_global"), (False, "feat_clamp2_raw")])
def test_clamp2_reproduces_reference(tiny_env, vectors, tmp_path, extract_clamp2, normalize, expected):
    out = tmp_path / "out"
    args = clamp2_args(vectors, vectors / "extract_in", out, *(["--normalize"] if normalize else []))
    assert extract_clamp2.main(args) == 0
    compare_tree(vectors / "expected" / expected, out)


def test_m3_reproduces_reference(tiny_env, vectors, tmp_path, extract_m3):
    out = tmp_path / "out"
    args = [str(vectors / "extract_in"), str(out), "--weights", str(vectors / "tiny_m3.pth"), "--num_workers", "0",
            "--no_progress"]
    assert extract_m3.main(args) == 0
    compare_tree(vectors / "expected" / "feat_m3", out)


@pytest.mark.parametrize("script", ["m3", "clamp2"])
def test_eager_attention_flag_gives_the_reference_features(tiny_env, vectors, tmp_path, extract_m3, extract_clamp2,
                                                           monkeypatch, script):
    """--attention eager (the original's kernel) reaches every transformer and gives the same features."""
    from clamp2.attention import attention_of, set_attention

    module = extract_m3 if script == "m3" else extract_clamp2
    kernels = []

    def spy(model, implementation):
        kernels.append(attention_of(set_attention(model, implementation)))
        return model

    monkeypatch.setattr("clamp2.attention.set_attention", spy)
    out = tmp_path / "out"
    if script == "m3":
        args = [str(vectors / "extract_in"), str(out), "--weights", str(vectors / "tiny_m3.pth"), "--num_workers", "0",
                "--no_progress", "--attention", "eager"]
    else:
        args = clamp2_args(vectors, vectors / "extract_in", out, "--normalize", "--attention", "eager")
    assert module.main(args) == 0
    assert kernels == [{"eager"}]
    compare_tree(vectors / "expected" / ("feat_m3" if script == "m3" else "feat_clamp2_global"), out)


@pytest.mark.parametrize("normalize", [True, False])
def test_features_do_not_depend_on_batching(tiny_env, vectors, tmp_path, extract_clamp2, normalize):
    # The inputs include music longer than PATCH_LENGTH (420 patches vs 32) and texts longer than
    # MAX_TEXT_LENGTH (49 tokens vs 16): overlapping last windows and their weights are exercised.
    flag = ["--normalize"] if normalize else []
    one, many = tmp_path / "b1", tmp_path / "b16"
    assert extract_clamp2.main(clamp2_args(vectors, vectors / "extract_in", one, "--batch_size", "1", *flag)) == 0
    assert extract_clamp2.main(clamp2_args(vectors, vectors / "extract_in", many, "--batch_size", "16",
                                           "--num_workers", "2", "--files_per_chunk", "3", *flag)) == 0
    for path in one.rglob("*.npy"):
        np.testing.assert_allclose(np.load(many / path.relative_to(one)), np.load(path), atol=1e-5)


def test_pad_batch_equals_pad_sequence_for_every_window_kind():
    """The NumPy padding (the host's fast path) gives torch's pad_sequence and the length mask, dtypes kept."""
    from clamp2.extraction.core import pad_batch

    generator = torch.Generator().manual_seed(0)
    kinds = {  # patch ids (uint8), text ids (int64), MERT rows (float32), bf16 rows (the pad_sequence path)
        "patches": ([torch.randint(0, 128, (n, 8), dtype=torch.uint8, generator=generator) for n in (3, 1, 5)], 0),
        "text": ([torch.randint(0, 99, (n,), generator=generator) for n in (4, 7, 1)], 1),
        "rows": ([torch.randn(n, 6, generator=generator) for n in (2, 2, 9)], 0.0),
        "bf16": ([torch.randn(n, 6, generator=generator).bfloat16() for n in (2, 4)], 0.0),
    }
    for name, (windows, pad_value) in kinds.items():
        expected = torch.nn.utils.rnn.pad_sequence(windows, batch_first=True, padding_value=pad_value)
        for dtype in (None, torch.long, torch.float32):  # padded straight into the runner's dtype (extraction on CPU)
            ids, masks = pad_batch(windows, pad_value, dtype=dtype)
            assert ids.dtype == (dtype or windows[0].dtype), name
            assert torch.equal(ids, expected.to(ids.dtype)), (name, dtype)
            assert masks.dtype == torch.int64
            assert masks.tolist() == [[1] * len(w) + [0] * (ids.shape[1] - len(w)) for w in windows], name
        numpy_windows = [w.numpy() for w in windows if w.dtype != torch.bfloat16]
        if numpy_windows:
            assert torch.equal(pad_batch(numpy_windows, pad_value, dtype=torch.long)[0],
                               pad_batch(windows, pad_value)[0].long()), name


def test_extraction_freezes_the_heap_for_the_collector_and_gives_it_back(vectors, tmp_path):
    # The objects existing at the start (libraries, the jobs) are out of the collector's full passes during the
    # run, and are handed back after it; a caller's own frozen objects stay frozen (one permanent generation).
    import gc

    from clamp2.extraction import core
    from clamp2.patchilizer import M3Patchilizer

    music = (sorted((vectors / "extract_in").rglob("*.abc")) + sorted((vectors / "extract_in").rglob("*.mtf")))[:3]
    runner = core.KindRunner(core.MusicEncoder(M3Patchilizer(64, 32)), lambda ids, masks: ids.float().sum(2)[:, :2], 32, 0)
    assert gc.get_freeze_count() <= clamp2.INTERPRETER_FROZEN  # CPython 3.12 starts with some of its own frozen
    for caller_froze in (False, True):
        jobs = [core.Job(path, tmp_path / f"{caller_froze}/{path.stem}.npy", "music") for path in music]
        if caller_froze:
            gc.freeze()
        before = gc.get_freeze_count()
        during = []
        try:
            result = core.extract_jobs(jobs, {"music": runner}, torch.device("cpu"), False, batch_size=2,
                                       on_file_done=lambda job, error: during.append(gc.get_freeze_count()))
            assert result.written == 3 and len(during) == 3, result.failures
            if caller_froze:  # nothing frozen on top (the count only falls, as frozen objects die), nothing thawed
                assert max(during) <= before and 0 < gc.get_freeze_count() <= before
            else:
                assert min(during) >= 1000  # at least the imported modules and the jobs were frozen
                assert gc.get_freeze_count() == 0
        finally:
            gc.unfreeze()


def test_the_interpreters_own_frozen_objects_are_no_callers_freeze(vectors, tmp_path, monkeypatch):
    # CPython 3.12 starts with some of its immortal tuples frozen (3.11 and 3.13 with none): the extraction froze
    # nothing there, as if a caller had. Stood for on any Python by objects frozen before the count was read.
    import gc

    from clamp2.extraction import core
    from clamp2.patchilizer import M3Patchilizer

    music = sorted((vectors / "extract_in").rglob("*.abc"))[:2]
    runner = core.KindRunner(core.MusicEncoder(M3Patchilizer(64, 32)), lambda ids, masks: ids.float().sum(2)[:, :2],
                             32, 0)
    gc.freeze()
    try:
        monkeypatch.setattr(clamp2, "INTERPRETER_FROZEN", gc.get_freeze_count())
        jobs = [core.Job(path, tmp_path / f"{path.stem}.npy", "music") for path in music]
        during = []
        result = core.extract_jobs(jobs, {"music": runner}, torch.device("cpu"), False, batch_size=2,
                                   on_file_done=lambda job, error: during.append(gc.get_freeze_count()))
        assert result.written == 2, result.failures
        assert min(during) > clamp2.INTERPRETER_FROZEN  # the jobs and what the run made before them: frozen too
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_worker_tasks_travel_packed_and_unpack_to_the_same_items():
    import pickle

    from clamp2.extraction.core import _pack_task, _task_items

    music = [np.full((n, 4), n, dtype=np.uint8) for n in (3, 1, 0, 5)]
    tasks = {
        "music with failures": [(7, music[0], None), (8, None, "bad"), (9, music[1], None), (10, music[2], None),
                                (11, music[3], None), (12, None, "worse")],
        "text beside music": [(0, np.arange(4), None), (1, music[0], None)],  # dtypes differ: not packed
        "one file": [(3, music[0], None)],
        "failures only": [(4, None, "a"), (5, None, "b")],
    }
    for name, items in tasks.items():
        task = pickle.loads(pickle.dumps(_pack_task(items)))  # as a worker's task reaches the main process
        got = list(_task_items(task))
        assert [(index, error) for index, _, error in got] == [(index, error) for index, _, error in items], name
        for (_, ids, _), (_, expected, _) in zip(got, items):
            assert (ids is None) == (expected is None), name
            if ids is not None:
                assert ids.dtype == expected.dtype and np.array_equal(ids, expected), name
    assert _pack_task(tasks["music with failures"])[0] == "packed"
    assert _pack_task(tasks["text beside music"]) is tasks["text beside music"]


def test_pad_batch_pins_ids_and_masks_for_a_cuda_copy(monkeypatch):
    # On CUDA the batch is padded straight into page-locked memory (no torch copy afterwards, which on a host
    # whose cores the tokenizing workers keep busy waits for every thread of torch's pool). This machine has
    # no pinned allocator: record what is asked for and hand back ordinary memory.
    from clamp2.extraction import core

    asked = []

    def host_tensor(shape, dtype, pin_memory):
        asked.append((dtype, pin_memory))
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(core, "_host_tensor", host_tensor)
    windows = [np.full((n, 4), n, dtype=np.uint8) for n in (2, 5, 1)]
    ids, masks = core.pad_batch(windows, 0, pin_memory=True)
    assert asked == [(torch.uint8, True), (torch.int64, True)]  # the ids keep their small dtype for the copy
    assert torch.equal(ids, torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in windows], batch_first=True))
    assert masks.tolist() == [[1, 1, 0, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]


def test_token_budget_batches_are_sorted_and_fit_the_budget():
    lengths = [3, 32, 7, 32, 1, 16, 16, 5, 2, 40]
    batches = plan_batches(lengths, batch_size=4, batch_tokens=48)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths, reverse=True)
    for batch in batches:  # windows × longest ≤ budget, or a single window longer than the budget
        assert len(batch) * lengths[batch[0]] <= 48 or len(batch) == 1
    assert [[lengths[i] for i in b] for b in batches] == [[40], [32], [32], [16, 16, 7], [5, 3, 2, 1]]
    # Without a budget: batch_size windows each, longest first.
    assert [len(b) for b in plan_batches(lengths, 4)] == [4, 4, 2]


@pytest.mark.parametrize("normalize", [True, False])
def test_token_budget_batching_gives_the_per_file_features(tiny_env, vectors, tmp_path, extract_clamp2, normalize):
    # 40 positions: short text and music windows share passes by the handful, full windows (32) go alone.
    flag = ["--normalize"] if normalize else []
    one, budget = tmp_path / "b1", tmp_path / "tokens"
    assert extract_clamp2.main(clamp2_args(vectors, vectors / "extract_in", one, "--batch_size", "1", *flag)) == 0
    assert extract_clamp2.main(clamp2_args(vectors, vectors / "extract_in", budget, "--batch_tokens", "40", *flag)) == 0
    paths = sorted(one.rglob("*.npy"))
    assert paths
    for path in paths:
        np.testing.assert_allclose(np.load(budget / path.relative_to(one)), np.load(path), atol=1e-5)


def test_compile_flag_compiles_every_runner_and_keeps_the_features(tiny_env, vectors, tmp_path, extract_m3, monkeypatch,
                                                                   recwarn):
    # The eager backend traces the graphs as inductor would, without the C++ compilation the CPU
    # cannot afford in a test; --compile's wiring and the traced graphs' numbers are what is checked.
    import clamp2.extraction.core as core

    compiled = []
    original = core.compile_runners

    def compile_eagerly(runners):
        compiled.extend(runners)
        return original(runners, backend="eager")

    monkeypatch.setattr(core, "compile_runners", compile_eagerly)
    out = tmp_path / "out"
    args = [str(vectors / "extract_in"), str(out), "--weights", str(vectors / "tiny_m3.pth"), "--num_workers", "0",
            "--no_progress", "--compile", "--batch_tokens", "64"]
    assert extract_m3.main(args) == 0
    assert compiled == ["music"]
    compare_tree(vectors / "expected" / "feat_m3", out)
    # The fp32 context's switch runs outside the graphs: dynamo warned once per flag builtin it met there.
    assert not [w for w in recwarn if "Dynamo does not know" in str(w.message)]


@pytest.mark.parametrize("script", ["m3", "clamp2"])
def test_fp32_batches_run_without_tf32(tiny_env, vectors, tmp_path, extract_m3, extract_clamp2, monkeypatch,
                                       tf32_allowed, cuda_machine, script):
    # A caller (or a library it imported) let TF32 in: --dtype fp32 still computes in fp32, and the flags come back.
    before = precision_flags()
    seen = []
    from clamp2 import attention

    original = attention.set_attention

    def recording(model, implementation):  # every submodule's forward pass records the flags it runs under
        for submodule in model.modules():
            submodule.register_forward_pre_hook(lambda *_: seen.append(precision_flags()))
        return original(model, implementation)

    monkeypatch.setattr(attention, "set_attention", recording)
    out = tmp_path / "out"
    if script == "m3":
        assert extract_m3.main([str(vectors / "extract_in"), str(out), "--weights", str(vectors / "tiny_m3.pth"),
                                "--num_workers", "0", "--no_progress"]) == 0
    else:
        assert extract_clamp2.main(clamp2_args(vectors, vectors / "extract_in", out)) == 0
    assert seen and set(seen) == {FP32_FLAGS}
    assert precision_flags() == before != FP32_FLAGS


def test_features_beside_their_inputs(tiny_env, vectors, tmp_path, extract_clamp2, capsys):
    # The reference takes every input wherever the output folder is: the input folder itself, or one
    # holding it, gets the features beside the pieces.
    inp = tmp_path / "in"
    shutil.copytree(vectors / "extract_in" / "abc", inp / "abc")
    assert extract_clamp2.main(clamp2_args(vectors, inp / "abc", inp / "abc", "--normalize")) == 0
    np.testing.assert_allclose(np.load(inp / "abc" / "airds_tune3.npy"),
                               np.load(vectors / "expected" / "feat_clamp2_global" / "abc" / "airds_tune3.npy"), atol=1e-5)
    assert extract_clamp2.main(clamp2_args(vectors, inp / "abc", inp, "--normalize")) == 0
    assert sorted(p.name for p in inp.glob("*.npy")) == ["airds_tune3.npy", "bwv10.7.npy"]
    capsys.readouterr()
    assert extract_clamp2.main(clamp2_args(vectors, inp / "abc", inp / "abc", "--normalize")) == 0  # a re-run skips
    assert "extracted 0, skipped 2 existing, failed 0" in capsys.readouterr().err
    (inp / "abc" / "bwv10.7.npy").write_bytes(b"")  # renamed into place but emptied by a power cut: redone
    assert extract_clamp2.main(clamp2_args(vectors, inp / "abc", inp / "abc", "--normalize")) == 0
    assert "extracted 1, skipped 1 existing, failed 0" in capsys.readouterr().err
    assert np.load(inp / "abc" / "bwv10.7.npy").shape == (1, 48)
    np.save(inp / "abc" / "bwv10.7.npy", np.zeros((1, 48), np.float32))  # --overwrite extracts again
    assert extract_clamp2.main(clamp2_args(vectors, inp / "abc", inp / "abc", "--normalize", "--overwrite")) == 0
    assert "extracted 2, skipped 0 existing, failed 0" in capsys.readouterr().err
    np.testing.assert_allclose(np.load(inp / "abc" / "bwv10.7.npy"),
                               np.load(vectors / "expected" / "feat_clamp2_global" / "abc" / "bwv10.7.npy"), atol=1e-5)


def test_bad_inputs_are_reported_and_skipped(tiny_env, vectors, tmp_path, extract_clamp2, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(vectors / "extract_in", inp)
    (inp / "abc" / "empty.abc").write_text("")
    (inp / "txt" / "blank.txt").write_text("\n\n\n")
    (inp / "txt" / "latin1.txt").write_bytes("caf\xe9 music".encode("latin-1"))
    (inp / "mtf" / "handmade.abc").write_text((inp / "abc" / "airds_tune3.abc").read_text())  # collides with handmade.mtf
    # Linux: a FIFO (reading it would wait forever) and a name that is not UTF-8 (Latin-1 bytes; its failure used
    # to crash the log's writing at the end of the run). macOS refuses such names, Windows has no FIFOs.
    posix_oddities = sys.platform.startswith("linux")
    if posix_oddities:
        os.mkfifo(inp / "abc" / "pipe.abc")
        (inp / "abc" / os.fsdecode(b"caf\xe9.abc")).write_text("")
    assert extract_clamp2.main(clamp2_args(vectors, inp, out, "--normalize")) == 1
    err = capsys.readouterr().err
    for name in ("empty.abc", "blank.txt", "latin1.txt", "handmade.abc", "handmade.mtf") + ("pipe.abc",) * posix_oddities:
        assert name in err
    assert f"extracted 6, skipped 0 existing, failed {7 if posix_oddities else 5}" in err
    log_bytes = (out / "failed_extract_clamp2.log").read_bytes()
    log = log_bytes.decode("utf-8", errors="surrogateescape")
    names = [line.split("\t")[0] for line in log.splitlines()]
    assert names == sorted(names)  # collisions are found first, listed in order
    assert names[0] == ("abc/caf\udce9.abc" if posix_oddities else "abc/empty.abc")
    assert "empty music file" in log and "no non-empty line" in log and "not UTF-8" in log and "rename" in log
    if posix_oddities:
        assert b"abc/caf\xe9.abc\tempty music file" in log_bytes  # the name's own bytes
        assert "abc/pipe.abc\tnot a regular file (a FIFO); skipped" in log
        (inp / "abc" / "pipe.abc").unlink()
        (inp / "abc" / os.fsdecode(b"caf\xe9.abc")).unlink()
    for stem in ("abc/empty", "txt/blank", "txt/latin1", "mtf/handmade"):
        assert not (out / f"{stem}.npy").exists()
    assert not list(out.rglob("*.partial"))
    # A re-run skips what exists and extracts only what was fixed. What a killed run was writing goes; the
    # logs of a run with two processes go too (this run writes its own; they would list fixed files).
    (inp / "mtf" / "handmade.abc").unlink()
    killed = out / "mtf" / ".handmade.npy.k1.partial"
    killed.write_bytes(b"\x93NUMPY half")
    unrelated = out / "mtf" / ".notes.txt.k1.partial"  # not an output of this run: left alone
    unrelated.write_bytes(b"")
    for index in (0, 1):
        (out / f"failed_extract_clamp2_{index}.log").write_text("abc/old.abc\tgone\n")
    before = (out / "abc" / "bwv10.7.npy").stat().st_mtime_ns
    assert extract_clamp2.main(clamp2_args(vectors, inp, out, "--normalize")) == 1
    err = capsys.readouterr().err
    assert "extracted 1, skipped 6 existing, failed 3" in err
    assert (out / "abc" / "bwv10.7.npy").stat().st_mtime_ns == before
    assert not killed.exists() and unrelated.exists()
    assert sorted(p.name for p in out.glob("failed_*")) == ["failed_extract_clamp2.log"]
    np.testing.assert_allclose(np.load(out / "mtf/handmade.npy"),
                               np.load(vectors / "expected/feat_clamp2_global/mtf/handmade.npy"), atol=1e-5)
    # Once every file is fixed (here: removed), a re-run leaves no failure log listing them.
    for name in ("abc/empty.abc", "txt/blank.txt", "txt/latin1.txt"):
        (inp / name).unlink()
    assert extract_clamp2.main(clamp2_args(vectors, inp, out, "--normalize")) == 0
    assert "extracted 0, skipped 7 existing, failed 0" in capsys.readouterr().err
    assert not list(out.glob("failed_*"))


def test_usage_errors(tiny_env, vectors, tmp_path, extract_clamp2, extract_m3, capsys):
    assert extract_m3.main([str(tmp_path / "nope"), str(tmp_path / "out"), "--weights", str(vectors / "tiny_m3.pth")]) == 2
    (tmp_path / "empty").mkdir()
    assert extract_m3.main([str(tmp_path / "empty"), str(tmp_path / "out"), "--weights", str(vectors / "tiny_m3.pth")]) == 2
    assert "no input files" in capsys.readouterr().err
    assert extract_m3.main([str(vectors / "extract_in"), str(tmp_path / "out"), "--weights", str(tmp_path / "weights_m3.pth")]) == 2
    err = capsys.readouterr().err
    assert "weights_m3.pth" in err and "sander-wood/clamp2" in err
    # A CLaMP 2 checkpoint is not an M3 checkpoint: the mismatch is named, nothing is written.
    assert extract_m3.main([str(vectors / "extract_in"), str(tmp_path / "out"), "--weights", str(vectors / "tiny_clamp2.pth")]) == 2
    assert "is a CLaMP 2 checkpoint; expected an M3 checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as info:
        extract_clamp2.main(["--help"])
    assert info.value.code == 0


def test_window_arithmetic():
    assert window_starts(10, 32) == [0]
    assert window_starts(64, 32) == [0, 32]
    assert window_starts(70, 32) == [0, 32, 38]
    assert window_weights(70, 32) == [32, 32, 6]
    assert window_weights(64, 32) == [32, 32]
    assert window_weights(10, 32) == [10]
    feats = torch.tensor([[1.0], [2.0], [4.0]])
    assert torch.allclose(combine_global(feats, 70, 32), torch.tensor([(32 + 64 + 24) / 70]))
    states = [torch.arange(32.0), torch.arange(32.0, 64.0), torch.arange(38.0, 70.0)]
    assert torch.equal(combine_positions(states, 70, 32), torch.arange(70.0))
    assert torch.equal(combine_positions(states[:2], 64, 32), torch.arange(64.0))


def test_text_lines_keep_first_occurrence_order():
    assert text_lines("b\n\na\nb\nc\na\n") == ["b", "a", "c"]


def test_text_lines_split_on_newline_only_and_keep_whitespace_lines(tmp_path):
    # The reference: item.split("\n"), then drops only the lines of length 0. A line of spaces or a
    # tab is a line (its tokens change the feature); a form feed or U+2028 is not a line break.
    assert text_lines("a\n  \nb\x0cc\u2028d\x85e\n\t\n\n") == ["a", "  ", "b\x0cc\u2028d\x85e", "\t"]
    # read_text_file opens in text mode, as the reference's open(..., "r"): CRLF and CR become "\n".
    text_file = tmp_path / "t.txt"
    text_file.write_bytes("one\r\ntwo\rthree\r\n \r\n".encode("utf-8"))
    assert text_lines(read_text_file(text_file)) == ["one", "two", "three", " "]


def test_whitespace_music_gets_special_patch_features_and_l18_only_fails(tiny_env, vectors, tmp_path, extract_m3,
                                                                          capsys):
    # As the reference: "\n" encodes to the two special patches; an ABC that is only "L:1/8\n"
    # is empty once M3 extraction removes that line (the reference crashes on it).
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "blank.abc").write_text("\n")
    (inp / "unit.abc").write_text("L:1/8\n")
    # Empty once transliterated (an empty file saved "UTF-8 with BOM", emoji only): the reference crashes.
    (inp / "bom_only.abc").write_text("\ufeff", encoding="utf-8")
    (inp / "emoji.abc").write_text("\U0001f3b5\ufeffL:1/8\n", encoding="utf-8")
    args = [str(inp), str(tmp_path / "out"), "--weights", str(vectors / "tiny_m3.pth"), "--num_workers", "0",
            "--no_progress"]
    assert extract_m3.main(args) == 1
    assert np.load(tmp_path / "out/blank.npy").shape == (1, 2, 64)
    err = capsys.readouterr().err
    for stem in ("unit", "bom_only", "emoji"):
        assert not (tmp_path / f"out/{stem}.npy").exists()
        assert f"{stem}.abc" in err
    assert "nothing left in ASCII" in (tmp_path / "out/failed_extract_m3.log").read_text()


def test_m3_keeps_unit_length_in_what_starts_as_mtf():
    """The reference removes "L:1/8\\n" unless the text starts with "ticks_per_beat" (a prefix, not a word)."""
    encoder = MusicEncoder(M3Patchilizer(64, 16), remove_unit_length=True)
    kept = encoder.encode_text("ticks_per_beat\t480\nL:1/8\nK:C\nabc|\n")
    removed = encoder.encode_text("X:1\nL:1/8\nK:C\nabc|\n")
    # (as ABC, the unbarred first line gives no patch)
    patches = [[bytes(row[1:].tolist()).split(b"\x02")[0] for row in ids] for ids in (kept, removed)]
    assert patches[0][1:-1] == [b"L:1/8\n", b"K:C\n", b"abc|\n"]
    assert patches[1][1:-1] == [b"X:1\n", b"K:C\n", b"abc|\n"]


def test_worker_dataset_pickles_without_the_model(vectors):
    # Spawn/forkserver start methods (macOS, Windows, Python 3.14) pickle the dataset.
    import pickle

    from clamp2.extraction.core import Job, MusicEncoder, _EncodeDataset
    from clamp2.patchilizer import M3Patchilizer

    path = vectors / "extract_in/abc/bwv10.7.abc"
    dataset = _EncodeDataset([Job(path, path.with_suffix(".npy"), "music")], {"music": MusicEncoder(M3Patchilizer(64, 32))})
    index, ids, error = pickle.loads(pickle.dumps(dataset))[0]
    assert error is None and isinstance(ids, np.ndarray) and ids.shape == (98, 64)


def test_chunks_hold_the_same_files_whatever_the_workers(vectors, monkeypatch):
    # Workers take tasks smaller than a chunk (and crossing chunk boundaries); each chunk must still be
    # planned as the same consecutive files, so batches and features do not change with the workers.
    from clamp2.extraction import core
    from clamp2.patchilizer import M3Patchilizer

    music = sorted((vectors / "extract_in").rglob("*.abc")) + sorted((vectors / "extract_in").rglob("*.mtf"))
    sources = [("music", music[i % len(music)]) for i in range(11)]
    sources[6] = ("music", vectors / "extract_in" / "missing.abc")  # a failure inside the second chunk
    runner = core.KindRunner(core.MusicEncoder(M3Patchilizer(64, 32)),
                             lambda ids, masks: (ids.sum(dim=2) * masks).cumsum(dim=1)[:, -1:].float(), 32, 0)
    chunks = []
    add = core.WindowStream.add

    def recording_add(self, encoded, kinds):
        chunks.append(sorted(encoded))
        return add(self, encoded, kinds)

    monkeypatch.setattr(core.WindowStream, "add", recording_add)
    monkeypatch.setattr(core, "MIN_PIECE", 1)
    assert core.worker_piece(5, 2) == 3  # tasks [0, 3), [3, 6), [6, 9), [9, 11): two cross a chunk boundary
    results = {}
    for workers in (0, 2):
        chunks.clear()
        got = list(core.iter_features(sources, {"music": runner}, torch.device("cpu"), False, batch_size=2,
                                      files_per_chunk=5, num_workers=workers))
        assert chunks == [[0, 1, 2, 3, 4], [5, 7, 8, 9], [10]]
        assert sorted(index for index, _, _ in got) == list(range(11))
        errors = {index: error for index, feature, error in got if error is not None}
        assert list(errors) == [6] and "missing.abc" in errors[6]
        results[workers] = {index: feature for index, feature, _ in got if feature is not None}
    for index, feature in results[0].items():
        np.testing.assert_array_equal(results[2][index], feature)


def test_host_times_attribute_the_main_process_waits_to_their_cause(vectors, tmp_path, monkeypatch):
    # Each stage is slowed in turn by a known sleep; the accounting must put that time where it was spent
    # (the bench's "main process:" tail is what tells a device run whether tokenizing, the model or writing bounds it).
    import time as clock

    from clamp2.extraction import core
    from clamp2.patchilizer import M3Patchilizer

    music = sorted((vectors / "extract_in").rglob("*.abc"))[:2]
    jobs = [core.Job(music[i % 2], tmp_path / f"out/{i}.npy", "music") for i in range(8)]
    encode = core.MusicEncoder(M3Patchilizer(64, 32))

    def run(encode=encode, forward=lambda ids, masks: ids.sum(dim=2).float()[:, :1].expand(-1, 4).contiguous()):
        for job in jobs:
            job.output.unlink(missing_ok=True)
        runner = core.KindRunner(encode, forward, 32, 0)
        result = core.extract_jobs(jobs, {"music": runner}, torch.device("cpu"), False, batch_size=4,
                                   files_per_chunk=8, writer_threads=1)
        assert result.written == len(jobs) and not result.failures
        return result.times

    def slow_encode(path):
        clock.sleep(0.03)
        return encode(path)

    def slow_forward(ids, masks):
        clock.sleep(0.1)
        return ids.sum(dim=2).float()[:, :1].expand(-1, 4).contiguous()

    parts = ("workers", "padding", "forward", "device", "writers")
    for times, slow, least in ((run(encode=slow_encode), "workers", 8 * 0.03), (run(forward=slow_forward), "forward", 0.1)):
        assert getattr(times, slow) >= least * 0.9, times
        assert getattr(times, slow) > 0.5 * times.total, times
        assert sum(getattr(times, name) for name in parts) <= times.total + 1e-6
    windows = sum(len(core.window_starts(len(encode(job.path)), 32)) for job in jobs)
    assert run(forward=slow_forward).forward >= 0.9 * 0.1 * -(-windows // 4)  # every batch's call is counted

    save = core.save_npy

    def slow_save(path, array):
        clock.sleep(0.05)
        save(path, array)

    monkeypatch.setattr(core, "save_npy", slow_save)
    times = run()  # one writer thread, 8 files: the main process ends waiting for most of the 0.4 s of saving
    assert times.writers >= 0.25 and times.writers > 0.5 * times.total, times
    summary = times.summary()
    assert summary.startswith("main process: workers ") and summary.endswith(f"of {times.total:.2f} s")
    assert "writers " in summary and "other " in summary
    assert core.HostTimes().summary() == "main process: no time measured"


def test_host_copy_gives_the_outputs_in_float32():
    # On CUDA the copy starts as soon as the batch is queued (pinned memory, an event to wait on); on
    # the CPU it is the tensor itself, in float32 as features are saved.
    from clamp2.extraction.core import HostCopy

    states = torch.randn(3, 5, 8, dtype=torch.bfloat16)
    copied = HostCopy(states)
    assert copied.done is None
    assert copied.wait().dtype == torch.float32 and torch.equal(copied.wait(), states.float())
    exact = torch.randn(2, 8)
    assert HostCopy(exact).wait() is exact


def test_worker_tasks_split_each_chunk_across_the_workers():
    from clamp2.extraction.core import MIN_PIECE, worker_piece

    assert worker_piece(4096, 8) == 512  # music21's tunes: all 8 workers tokenize the first chunk
    assert worker_piece(256, 4) == 64
    assert worker_piece(256, 0) == worker_piece(256, 1) == 256
    assert worker_piece(20, 4) == MIN_PIECE == 16
    assert worker_piece(8, 4) == 8


class FakeState:
    def __init__(self, index, count):
        self.process_index, self.num_processes = index, count


@pytest.mark.parametrize("first", [0, 1])
def test_process_shards_do_not_shift_when_another_process_finished_first(tiny_env, vectors, tmp_path, extract_m3,
                                                                          monkeypatch, first):
    out = tmp_path / "out"
    args = [str(vectors / "extract_in"), str(out), "--weights", str(vectors / "tiny_m3.pth"), "--num_workers", "0",
            "--no_progress"]
    for index in (first, 1 - first):
        monkeypatch.setattr("clamp2.extraction.core.process_state", lambda device: (FakeState(index, 2), torch.device("cpu")))
        assert extract_m3.main(args) == 0
    assert len(list(out.rglob("*.npy"))) == 4
    compare_tree(vectors / "expected" / "feat_m3", out)


def test_torchrun_two_cpu_processes_split_the_files(vectors, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT


    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", **TINY_ENV)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(REPO_ROOT / "code/extract_m3.py"), str(vectors / "extract_in"), str(tmp_path / "out"),
           "--weights", str(vectors / "tiny_m3.pth"), "--num_workers", "0", "--no_progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("extracted 2, skipped 0 existing, failed 0") == 2, proc.stderr[-3000:]
    compare_tree(vectors / "expected" / "feat_m3", tmp_path / "out")


def test_torchrun_a_failed_file_in_one_process_does_not_stop_the_other(vectors, tmp_path):
    """torchrun ends every process once one exits non-zero: extraction waits for all before exiting 1."""
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    music = tmp_path / "in"
    music.mkdir()
    # Files are sharded round-robin in sorted order: process 1 gets the empty files and finishes at once,
    # process 0 gets ten long pieces (the chorale's bars 30 times, ~400 windows each, one per pass).
    lines = (vectors / "extract_in" / "abc" / "bwv10.7.abc").read_text(encoding="utf-8").splitlines(keepends=True)
    header = [line for line in lines if not line.startswith("[V:")]
    long_piece = "".join(header + [line for line in lines if line.startswith("[V:")] * 30)
    for index in range(10):
        (music / f"p{2 * index:02d}.abc").write_text(long_piece, encoding="utf-8")
        (music / f"p{2 * index + 1:02d}.abc").write_text("")
    # Two inputs for one output: found while planning, before sharding, and reported by process 0 alone.
    (music / "q.abc").write_text(long_piece, encoding="utf-8")
    (music / "q.mtf").write_text("ticks_per_beat 480\n", encoding="utf-8")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", **TINY_ENV)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "--monitor-interval", "0.05", str(REPO_ROOT / "code/extract_m3.py"), str(music), str(tmp_path / "out"),
           "--weights", str(vectors / "tiny_m3.pth"), "--num_workers", "0", "--no_progress", "--batch_size", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "extract_m3 (process 0/2): extracted 10, skipped 0 existing, failed 2" in proc.stderr, proc.stderr[-3000:]
    assert "extract_m3 (process 1/2): extracted 0, skipped 0 existing, failed 10" in proc.stderr, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert len(list(out.glob("*.npy"))) == 10
    # One failure log per process, each with its own files.
    assert sorted(p.name for p in out.glob("failed_*")) == ["failed_extract_m3_0.log", "failed_extract_m3_1.log"]
    logged = {index: [line.split("\t")[0] for line in (out / f"failed_extract_m3_{index}.log").read_text().splitlines()]
              for index in (0, 1)}
    assert logged == {0: ["q.abc", "q.mtf"], 1: [f"p{2 * index + 1:02d}.abc" for index in range(10)]}


def test_file_feature_is_the_combination_to_the_bit():
    """One-window files take a numpy shortcut: the same rounding as combine_global / combine_positions."""
    import numpy as np

    from clamp2.extraction.core import file_feature, npy_bytes

    generator = torch.Generator().manual_seed(0)
    for length in (1, 7, 31, 32, 33, 70, 96):
        windows = len(window_starts(length, 32))
        outputs = [torch.randn(768, generator=generator) * 3 for _ in range(windows)]
        expected = combine_global(torch.stack(outputs), length, 32).unsqueeze(0).numpy()
        assert np.array_equal(file_feature(outputs, length, 32, per_position=False), expected)
        # the stream hands NumPy views of the fetched batch: the same bits
        assert np.array_equal(file_feature([o.numpy() for o in outputs], length, 32, per_position=False), expected)
        states = [torch.randn(min(32, length), 8, generator=generator) for _ in range(windows)]
        expected = combine_positions(states, length, 32).unsqueeze(0).numpy()
        assert np.array_equal(file_feature(states, length, 32, per_position=True), expected)
        assert np.array_equal(file_feature([s.numpy() for s in states], length, 32, per_position=True), expected)
    # A one-window file's states are copied out of the padded batch they are a view of.
    batch = torch.randn(4, 32, 8)
    assert not np.shares_memory(file_feature([batch[1, :20]], 20, 32, per_position=True), batch.numpy())
    assert not np.shares_memory(file_feature([batch.numpy()[1, :20]], 20, 32, per_position=True), batch.numpy())
    # The saved bytes are np.save's, header and all.
    import io

    for array in (np.ones((1, 768), np.float32), np.arange(24, dtype=np.float32).reshape(1, 3, 8)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        assert npy_bytes(array) == buffer.getvalue()
        assert npy_bytes(array[:, ::-1]) == npy_bytes(np.ascontiguousarray(array[:, ::-1]))


# -- found by a mutation audit: each fails on a plausible one-line bug the suite missed -----------------


def test_npy_bytes_equal_np_save_for_two_dtypes_of_one_shape():
    from clamp2.extraction.core import npy_bytes

    for dtype in (np.float32, np.float16, np.float32):
        array = np.arange(6, dtype=dtype).reshape(1, 6)
        buffer = io.BytesIO()
        np.save(buffer, array)
        assert npy_bytes(array) == buffer.getvalue()


def test_writer_groups_save_every_file_and_blame_only_the_one_that_cannot_be_written(tiny_env, vectors, tmp_path,
                                                                                    extract_m3, monkeypatch, capsys):
    # Groups of 2 files per writer task (16 in real runs) over 11 files: full groups handed to the writers
    # while the next fills, a short last one; one output whose folder is a file cannot be written.
    import clamp2.extraction.core as core

    monkeypatch.setattr(core, "SAVE_GROUP", 2)
    inp, out = tmp_path / "in", tmp_path / "out"
    for n in range(10):
        shutil.copytree(vectors / "extract_in" / ("abc" if n % 2 else "mtf"), inp / f"part{n}")
    (inp / "blocked").mkdir()
    shutil.copy(vectors / "extract_in" / "abc" / "bwv10.7.abc", inp / "blocked")
    out.mkdir()
    (out / "blocked").write_text("a file where the output folder would be")
    assert extract_m3.main([str(inp), str(out), "--weights", str(vectors / "tiny_m3.pth"), "--batch_size", "3",
                            "--num_workers", "0", "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "extracted 20, skipped 0 existing, failed 1" in err
    assert len(list(out.rglob("*.npy"))) == 20
    log = (out / "failed_extract_m3.log").read_text().splitlines()
    assert len(log) == 1 and log[0].startswith("blocked/bwv10.7.abc\t")


# ------------------------------------------------------------------------------------------------
# A run killed from outside: its tokenizing workers must not outlive it


def big_ids_telling_its_pid(folder):
    """An encoder whose ids fill the pipe to the main process (so a worker's queue blocks), telling its pid."""
    import pathlib

    (pathlib.Path(folder) / str(os.getpid())).touch()
    return torch.zeros((1 << 16, 8), dtype=torch.uint8)


def slow_forward(ids, masks):
    import time

    time.sleep(60)
    return torch.zeros((len(ids), 4))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_tokenizing_workers_do_not_outlive_a_killed_extraction(tmp_path, signal_name):
    # A killed extraction (SIGKILL, or SIGTERM's default action) left its DataLoader workers running forever,
    # reparented: their prefetched tasks filled the pipe, and a worker's exit waits for its queue to flush.
    from pathlib import Path

    from conftest import REPO_ROOT

    pids = tmp_path / "pids"
    pids.mkdir()
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import torch, test_extract as t\n"
            "from clamp2.extraction.core import KindRunner, iter_features\n"
            "runner = KindRunner(t.big_ids_telling_its_pid, t.slow_forward, 32, 0)\n"
            "for _ in iter_features([('music', sys.argv[3])] * 64, {'music': runner}, torch.device('cpu'), False,"
            " files_per_chunk=4, num_workers=2): pass\n")
    # settle: the workers' prefetched tasks fill the pipe while the model is busy
    command = [sys.executable, "-c", code, str(Path(__file__).parent), str(REPO_ROOT), str(pids)]
    alive = workers_outliving_a_kill(command, signal_name, lambda run: [int(p.name) for p in pids.iterdir()], settle=2)
    assert not alive, f"tokenizing workers {alive} outlived the killed extraction"


# the reference's line after loading (sanderwood/clamp2 code/extract_clamp2.py and code/extract_m3.py), on stdout.
def test_clamp2_and_m3_print_the_reference_loaded_line(tiny_env, vectors, tmp_path, extract_clamp2, extract_m3, capsys):
    assert extract_clamp2.main(clamp2_args(vectors, vectors / "extract_in" / "txt", tmp_path / "c2")) == 0
    assert "Successfully Loaded CLaMP 2 Checkpoint from Epoch 1 with loss 1.0\n" in capsys.readouterr().out
    args = [str(vectors / "extract_in" / "abc"), str(tmp_path / "m3"), "--weights", str(vectors / "tiny_m3.pth"),
            "--num_workers", "0", "--no_progress"]
    assert extract_m3.main(args) == 0
    assert "Successfully Loaded Checkpoint from Epoch 1 with loss 1.0\n" in capsys.readouterr().out
