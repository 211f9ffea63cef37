"""Permissions as a non-root user meets them, faked so that the suite also checks them when run as root."""

import json
import os
from pathlib import Path

import pytest

from clamp2.files import input_problem, output_problem
from conftest import unlistable


def deny_access(monkeypatch, path: Path, bit: int) -> None:
    """``os.access`` says no to ``bit`` (``os.W_OK``, ``os.R_OK``) for ``path``: a file or folder this user may not
    write or read, which root always may."""
    access = os.access
    monkeypatch.setattr(os, "access", lambda where, mode, **kw: False if Path(where) == path and mode & bit
                        else access(where, mode, **kw))


def write_query_and_reference_features(root: Path, keys: str) -> None:
    """``root/q`` and ``root/r``: one random [1, 8] feature per key in each."""
    import numpy as np

    for side, seed in (("q", 1), ("r", 2)):
        (root / side).mkdir()
        for key, row in zip(keys, np.random.default_rng(seed).standard_normal((len(keys), 1, 8), dtype=np.float32)):
            np.save(root / side / f"{key}.npy", row)


def refuse_under(monkeypatch, folder: Path, call: str = "stat"):
    """``os.<call>`` raises EACCES for every path under ``folder`` (not ``folder`` itself): a folder the user may
    not search (chmod 000 or 600), which root can always search."""
    real = getattr(os, call)
    inside = os.fspath(folder) + os.sep

    def refusing(path, *args, **kwargs):
        if os.fspath(path).startswith(inside):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, call, refusing)


def test_paths_under_an_unsearchable_folder_are_one_line_not_a_traceback(tmp_path, monkeypatch):
    # Path.exists/is_dir/is_file raise PermissionError (before Python 3.14) for such a path: every script that
    # checked its folders that way ended in a traceback (extract_*.py, batch_*.py, the trainers, the searches).
    from clamp2.convert.batch_runner import BatchUsageError, plan_jobs

    locked = tmp_path / "locked"
    (locked / "in").mkdir(parents=True)
    (locked / "in" / "a.abc").write_text("X:1\n")
    refuse_under(monkeypatch, locked)
    for problem in (input_problem(locked / "in"), output_problem(locked / "out", folder=True)):
        assert problem and "cannot reach" in problem and "Permission denied" in problem and "locked" in problem
    with pytest.raises(BatchUsageError, match="cannot reach input folder .*Permission denied"):
        plan_jobs(locked / "in", tmp_path / "out", [".abc"], ".abc")
    with pytest.raises(BatchUsageError, match="cannot reach output folder .*Permission denied"):
        plan_jobs(tmp_path, locked / "out", [".abc"], ".abc")


def test_an_input_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    # chmod 000 on the input folder: the trainers used it as an empty folder (the run went on without its files).
    folder = tmp_path / "in"
    folder.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access",
                        lambda path, mode, **kw: False if Path(path) == folder else access(path, mode, **kw))
    assert "cannot read input folder" in input_problem(folder)


def test_trainer_data_folders_with_an_unlistable_sub_folder_are_refused(tmp_path, monkeypatch):
    # train_m3.py left the files of a chmod 000 sub-folder out of training without a word (exit status 0).
    from clamp2.training.data import DataError, find_music_files

    for rel in ("a/x.abc", "locked/y.abc"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("X:1\nK:C\nC\n")
    unlistable(monkeypatch, "locked")
    with pytest.raises(DataError, match="locked: cannot list this folder: Permission denied"):
        find_music_files([tmp_path])


def test_jsonl_music_under_an_unsearchable_folder_is_a_data_error(tmp_path, monkeypatch):
    # train_clamp2.py ended in a PermissionError traceback (Path.is_file) for such a file.
    from clamp2.training.data import DataError, read_pairs

    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "a.abc").write_text("X:1\nK:C\nC\n")
    item = {"summary_en": "a tune", "summary_nen": {"language": "German", "summary": "ein Lied"},
            "filepaths": ["locked/a.abc"]}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(item) + "\n", encoding="utf-8")
    refuse_under(monkeypatch, tmp_path / "locked")
    with pytest.raises(DataError, match="cannot reach music file .*a.abc: Permission denied"):
        read_pairs(tmp_path / "pairs.jsonl", require_non_english=False)


def test_a_feature_folder_that_cannot_be_searched_is_a_feature_error(tmp_path, monkeypatch):
    # semantic_search.py FEATURES (chmod 000) ended in a PermissionError traceback from is_index (Path.is_file).
    from clamp2.search.feature_store import FeatureError, read_features

    folder = tmp_path / "features"
    folder.mkdir()
    refuse_under(monkeypatch, folder)
    with pytest.raises(FeatureError, match="cannot reach .*features: Permission denied"):
        read_features(folder)


def test_probe_feature_folders_with_an_unlistable_sub_folder_are_refused(tmp_path, monkeypatch):
    # train_cls.py and inference_cls.py left a chmod 000 sub-folder's features out without a word (exit status 0).
    import numpy as np

    from clamp2.probe.data import ProbeUsageError, discover

    for rel in ("jazz_1.npy", "locked/folk_1.npy"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / rel, np.zeros((1, 4), np.float32))
    unlistable(monkeypatch, "locked")
    with pytest.raises(ProbeUsageError, match="locked: cannot list this folder: Permission denied"):
        discover([tmp_path], "training")


def test_an_unreadable_audio_file_says_so(tmp_path, monkeypatch):
    # extract_mert.py logged a chmod 000 file as "cannot decode audio (Error opening '...': System error.)".
    import soundfile

    from clamp2.extraction import audio

    path = tmp_path / "a.wav"
    soundfile.write(path, [[0.0]] * 1600, 16000)

    def refusing(name, *args, **kwargs):
        raise PermissionError(13, "Permission denied", os.fspath(name))

    def libsndfile(name, *args, **kwargs):  # what libsndfile raises for a file it may not open
        raise RuntimeError(f"Error opening {os.fspath(name)!r}: System error.")

    monkeypatch.setattr(soundfile, "SoundFile", libsndfile)
    monkeypatch.setattr(audio, "open", refusing, raising=False)
    with pytest.raises(audio.AudioError, match="cannot read the file: Permission denied"):
        audio._read_all(path)


def test_clamp3_inputs_with_an_unlistable_sub_folder_are_refused(tmp_path, monkeypatch):
    # clamp3_embd / clamp3_search left a chmod 000 sub-folder's files out without a word.
    from clamp2.search.clamp3 import files_by_modality

    for rel in ("a.mid", "locked/b.mid"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"MThd")
    assert [p.name for p in files_by_modality(tmp_path)["mid"]] == ["a.mid", "b.mid"]
    unlistable(monkeypatch, "locked")
    with pytest.raises(OSError, match="locked: cannot list this folder: Permission denied"):
        files_by_modality(tmp_path)


def test_summaries_under_an_unlistable_sub_folder_are_reported(tmp_path, monkeypatch):
    # gpt4_summarize.py and merge_jsonl.py left them out without a word.
    import openai

    from clamp2.convert.summarize import merge_summaries, summarize_folder

    record = {"summary_en": "a tune", "summary_nen": {"language": "German", "summary": "ein Lied"},
              "filepaths": ["a.abc"]}
    for rel in ("one.json", "locked/two.json"):
        (tmp_path / "s" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "s" / rel).write_text(json.dumps(record), encoding="utf-8")
    (tmp_path / "a.abc").write_text("X:1\nK:C\nC\n")
    unlistable(monkeypatch, "locked")
    said = []
    result = merge_summaries(tmp_path / "s", tmp_path / "all.jsonl", echo=said.append)
    assert result.written == 1 and [name for name, _ in result.skipped] == ["locked"]
    assert len(said) == 1 and said[0].startswith("skipped: locked: cannot list this folder: Permission denied")
    (tmp_path / "s" / "one.json").unlink()  # only the locked folder: no request is sent
    client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    counts = summarize_folder(tmp_path / "s", tmp_path / "out", client, "model", progress=False, echo=said.append)
    assert counts.failed == 1 and [name for name, _ in counts.failures] == ["locked"]


def test_an_unreadable_training_file_is_refused_before_training(tmp_path, monkeypatch):
    # train_m3.py met a chmod 000 file only when a batch drew it, mid-training.
    from clamp2.training.data import DataError, check_music_files

    paths = [tmp_path / "a.abc", tmp_path / "b.abc"]
    for path in paths:
        path.write_text("X:1\nK:C\nC\n")
    check_music_files(paths)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path).name == "b.abc"
                        else access(path, mode, **kw))
    with pytest.raises(DataError, match="files this user may not read .*b.abc"):
        check_music_files(paths)


def test_an_index_file_that_cannot_be_read_is_not_called_damaged(tmp_path, monkeypatch):
    # "damaged index (...Permission denied...); rebuild it with build_index.py": a rebuild would not help.
    import numpy as np

    from clamp2.search.feature_store import FeatureError, build_index, open_index

    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "a.npy", np.ones((1, 4), np.float32))
    build_index(tmp_path / "f", tmp_path / "index", progress=False)
    assert len(open_index(tmp_path / "index").names) == 1
    load = np.load

    def refusing(path, *args, **kwargs):
        if Path(path).name.startswith("vectors."):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", refusing)
    with pytest.raises(FeatureError, match=r"cannot read the index's vectors\.1\.npy \(Permission denied\); fix its "
                                           "permissions"):
        open_index(tmp_path / "index")


def test_a_text_model_folder_that_cannot_be_read_says_so_with_what_to_do(tmp_path, monkeypatch):
    # A chmod 000 text model folder gave a bare "error: [Errno 13] Permission denied: '.../config.json'".
    from clamp2.text_model import TextModelUnavailable, load_tokenizer

    folder = tmp_path / "text_model"
    folder.mkdir()
    refuse_under(monkeypatch, folder)
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", os.fspath(path))))
    with pytest.raises(TextModelUnavailable, match="cannot load the text model/tokenizer from the folder .*this "
                                                   "user may not read it .*Permission denied.*fix its permissions"):
        load_tokenizer(str(folder))


def test_a_summary_that_cannot_be_read_is_skipped_and_named(tmp_path, monkeypatch):
    # merge_jsonl.py: a summary this user may not read raised out of the merge, reported as the JSONL's write.
    import builtins

    import clamp2.convert.summarize as summarize

    record = {"summary_en": "a tune", "summary_nen": {"language": "German", "summary": "ein Lied"},
              "filepaths": ["a.abc"]}
    for name in ("one.json", "two.json"):
        (tmp_path / "s" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "s" / name).write_text(json.dumps(record), encoding="utf-8")
    (tmp_path / "a.abc").write_text("X:1\nK:C\nC\n")

    def refusing(path, *args, **kwargs):
        if Path(path).name == "two.json":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(summarize, "open", refusing, raising=False)
    result = summarize.merge_summaries(tmp_path / "s", tmp_path / "all.jsonl", echo=lambda line: None)
    assert result.written == 1 and result.skipped == [("two.json", "cannot read it (Permission denied)")]


def test_an_output_that_cannot_be_created_is_named_not_its_temporary_file(tmp_path, monkeypatch, capsys):
    # A read-only output sub-folder failed each file naming '.b.out.<random>.partial', a name the user never chose.
    from clamp2.convert.batch_runner import convert_folder
    from clamp2.files import atomic_write_text

    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "b.txt").write_text("b")
    (tmp_path / "in" / "a.txt").write_text("a")
    (tmp_path / "out" / "sub").mkdir(parents=True)
    refuse_under(monkeypatch, tmp_path / "out" / "sub", "open")
    with pytest.raises(PermissionError) as raised:
        atomic_write_text(tmp_path / "out" / "sub" / "c.out", "c")
    assert raised.value.filename == str(tmp_path / "out" / "sub" / "c.out")
    assert convert_folder(tmp_path / "in", tmp_path / "out", convert=Path.read_text, extensions=[".txt"],
                          output_suffix=".out", tool="t", workers=1, progress=False) == 1
    reason = (tmp_path / "out" / "failed_t.log").read_text()
    assert reason.startswith("sub/b.txt\tPermissionError: [Errno 13] Permission denied (cannot create a file in its "
                             "folder): ") and str(tmp_path / "out" / "sub" / "b.out") in reason
    assert ".partial" not in reason + capsys.readouterr().err and (tmp_path / "out" / "a.out").read_text() == "a"


# Each script's first look at a path it is given, under a folder this user may not search: Path.exists/is_file/
# is_dir raised a PermissionError traceback there (checked as a non-root user), and now it is one line.
FIRST_LOOKS = [
    ("semantic_search/clamp2_eval.py", lambda locked, free: [locked, free], "folder"),
    ("semantic_search/clamp2_search.py", lambda locked, free: ["a tune", locked], "target"),
    ("semantic_search/clamp3_embd.py", lambda locked, free: [locked, free / "out"], "input folder"),
    ("semantic_search/clamp3_eval.py", lambda locked, free: [free, locked], "folder"),
    ("semantic_search/clamp3_score.py", lambda locked, free: [locked, free], "folder"),
    ("semantic_search/clamp3_search.py", lambda locked, free: [locked / "q.abc", free], "query file"),
    ("semantic_search/clamp3_search.py", lambda locked, free: [free / "q.abc", locked], "folder"),
    ("semantic_search/zero_shot.py", lambda locked, free: [locked, "--labels", "jig,reel"], "folder"),
    ("process_data/gpt4_summarize.py", lambda locked, free: [locked, free / "out", "--model", "m"], "input folder"),
    ("process_data/gpt4_summarize.py", lambda locked, free: [free, locked, "--model", "m"], "output folder"),
    ("process_data/merge_jsonl.py", lambda locked, free: [locked, free / "o.jsonl"], "summaries folder"),
    ("process_data/merge_jsonl.py", lambda locked, free: [free, free / "o.jsonl", "--data_root", locked], "data root"),
    ("code/train_clamp2.py", lambda locked, free: ["--train_jsonl", locked / "a.jsonl"], "JSONL file"),
    ("code/train_clamp3_audio.py", lambda locked, free: ["--train_jsonl", locked / "a.jsonl"], "JSONL file"),
    ("code/quickstart.py", lambda locked, free: ["--out", locked], "output"),
    ("music_classification/inference_cls.py", lambda locked, free: [free, free / "o.jsonl", "--weights",
                                                                    locked / "w.pth"], "checkpoint"),
]


@pytest.mark.parametrize("script, argv, what", FIRST_LOOKS, ids=[f"{s.split('/')[1]}-{w}" for s, _, w in FIRST_LOOKS])
def test_a_path_under_an_unsearchable_folder_is_one_line(script, argv, what, tmp_path, monkeypatch, capsys):
    from conftest import load_script

    locked, free = tmp_path / "locked", tmp_path / "free"
    (locked / "sub").mkdir(parents=True)
    free.mkdir()
    (free / "q.abc").write_text("X:1\nK:C\nC\n")
    (free / "a.json").write_text("{}")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key-0123456789")
    main = load_script(script).main
    refuse_under(monkeypatch, locked)
    try:
        status = main([str(arg) for arg in argv(locked / "sub", free)])
    except SystemExit as exit:
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert f"cannot reach {what} {locked / 'sub'}" in err and "Permission denied" in err, err


def test_batch_converters_refuse_unreadable_input_and_unwritable_output_folders_before_work(tmp_path, monkeypatch,
                                                                                             capsys):
    # batch_*.py as a non-root user: an output folder under a read-only parent ended in a PermissionError traceback
    # (mkdir, after the listing); a chmod 000 input folder was one failure named "." and exit status 1.
    from clamp2.convert.batch_runner import convert_folder

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a")
    (tmp_path / "ro").mkdir()
    access = os.access
    refused = {tmp_path / "in", tmp_path / "ro"}
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) in refused
                        else access(path, mode, **kw))

    def run(input_dir, output_dir):
        return convert_folder(input_dir, output_dir, convert=Path.read_text, extensions=[".txt"],
                              output_suffix=".out", tool="t", workers=1, progress=False)

    assert run(tmp_path / "in", tmp_path / "out") == 2
    assert f"cannot read input folder {tmp_path / 'in'}: permission denied" in capsys.readouterr().err
    refused.discard(tmp_path / "in")
    assert run(tmp_path / "in", tmp_path / "ro" / "out") == 2
    assert f"cannot write output folder {tmp_path / 'ro' / 'out'}: {tmp_path / 'ro'} is not writable" in (
        capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ro" / "out").exists()


def test_an_unreadable_mert_feature_file_is_not_called_a_damaged_array(tmp_path, monkeypatch):
    # extract_clamp3.py logged a chmod 000 .npy as "not a NumPy .npy array ([Errno 13] Permission denied ...)".
    import builtins

    import numpy as np

    from clamp2.extraction.core import AudioEncoder, InputError

    path = tmp_path / "a.npy"
    np.save(path, np.zeros((2, 8), np.float32))
    assert AudioEncoder(8)(path).shape == (4, 8)
    real_open = builtins.open

    def refusing(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    with pytest.raises(InputError, match=r"^cannot read the file: Permission denied$"):
        AudioEncoder(8)(path)


def test_a_mert_folder_that_cannot_be_read_says_so_with_what_to_do(tmp_path, monkeypatch):
    # extract_mert.py --model DIR (chmod 000) said only "error: [Errno 13] Permission denied: 'DIR/config.json'".
    from clamp2.checkpoint import CheckpointError
    from clamp2.models.mert import load_mert

    folder = tmp_path / "mert"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    refuse_under(monkeypatch, folder)
    with pytest.raises(CheckpointError, match=r"cannot reach MERT config .*config.json: Permission denied .*fix its "
                                              "permissions"):
        load_mert(folder)
    monkeypatch.undo()
    read_text = Path.read_text

    def refusing(self, *args, **kwargs):  # config.json alone chmod 000: its folder can be searched
        if self == folder / "config.json":
            raise PermissionError(13, "Permission denied", os.fspath(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refusing)
    with pytest.raises(CheckpointError, match=r"cannot read MERT config .*config.json: Permission denied; fix its"):
        load_mert(folder)


def test_a_read_only_training_log_is_refused_before_training(tmp_path, monkeypatch, tiny_env, capsys):
    # train_m3.py (all trainers) with a read-only log file trained a whole epoch, then ended in a PermissionError
    # traceback from the log's append.
    import shutil

    from conftest import VECTORS, load_script

    (tmp_path / "data").mkdir()
    for index in range(6):
        shutil.copy(VECTORS / "extract_in" / "abc" / "airds_tune3.abc", tmp_path / "data" / f"t{index}.abc")
    log = tmp_path / "w.txt"
    log.write_text("Epoch 1\n")
    deny_access(monkeypatch, log, os.W_OK)
    monkeypatch.setenv("M3_BATCH_SIZE", "2")
    monkeypatch.setenv("M3_LOGS_PATH", str(log))
    status = load_script("code/train_m3.py").main(["--train_folders", str(tmp_path / "data"), "--epochs", "1",
                                                   "--weights", str(tmp_path / "w.pth"), "--precision", "fp32",
                                                   "--no_progress"])
    err = capsys.readouterr().err
    assert status == 2 and f"cannot write log file {log}: it is read-only; fix its permissions" in err, err
    assert "Traceback" not in err and log.read_text() == "Epoch 1\n" and not list(tmp_path.glob("*.pth"))


def test_a_read_only_probe_log_is_refused_before_training(tmp_path, monkeypatch, capsys):
    # train_cls.py with a read-only --logs file ended in a PermissionError traceback after the first epoch, its
    # weights already written (checked as a non-root user).
    from conftest import load_script
    from probe_features import class_means, write_features

    write_features(tmp_path / "train", class_means(["folk", "jazz"], dim=8, separation=0.35, seed=3), 10, seed=1)
    log = tmp_path / "log.txt"
    log.write_text("earlier\n")
    deny_access(monkeypatch, log, os.W_OK)
    status = load_script("music_classification/train_cls.py").main(
        ["--train_folders", str(tmp_path / "train"), "--weights", str(tmp_path / "p.pth"), "--logs", str(log),
         "--epochs", "1", "--hidden_size", "16", "--no_progress"])
    err = capsys.readouterr().err
    assert status == 2 and f"cannot write log file {log}: it is read-only; fix its permissions" in err, err
    assert "Traceback" not in err and log.read_text() == "earlier\n" and not list(tmp_path.glob("*.pth"))


def test_zero_shot_checks_its_folder_and_outputs_before_the_model_loads(tmp_path, monkeypatch, capsys):
    # As a non-root user: a folder at chmod 000 or 300 gave an empty zero_shot.json and exit 1 after the model had
    # loaded; a --confusion_png in a read-only folder a PermissionError traceback after every file was classified.
    from conftest import load_script

    music, read_only = tmp_path / "music", tmp_path / "ro"
    music.mkdir()
    read_only.mkdir()
    (music / "jig_a.abc").write_text("X:1\nK:C\nC\n")
    access = os.access
    refused = {(music, os.R_OK), (read_only, os.W_OK)}
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if any(
        Path(path) == folder and mode & bit for folder, bit in refused) else access(path, mode, **kw))
    main = load_script("semantic_search/zero_shot.py").main
    missing = tmp_path / "no_weights.pth"  # were the model loaded first, its error would be the one said
    output = ["--output", str(tmp_path / "z.json")]
    cases = [([music, *output], f"cannot read folder {music}: permission denied (it cannot be listed); fix its "
                                "permissions"),
             ([tmp_path, "--output", read_only / "z.json"], f"cannot write output file {read_only / 'z.json'}"),
             ([tmp_path, *output, "--confusion_png", read_only / "c.png"],
              f"cannot write confusion PNG file {read_only / 'c.png'}")]
    for args, says in cases:
        with pytest.raises(SystemExit) as exit:
            main([str(a) for a in args] + ["--labels", "jig,reel", "--weights", str(missing)])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(f"error: {says}") and err.count("\n") == 1, err
    assert not (tmp_path / "z.json").exists() and not list(read_only.iterdir())


@pytest.mark.parametrize("script, flag", [("semantic_search/clamp2_eval.py", "--ranks"),
                                          ("semantic_search/semantic_search_metrics.py", "--ranks"),
                                          ("semantic_search/clamp2_fmd.py", "--per_file")])
def test_a_results_file_in_a_read_only_folder_is_refused_before_the_work(script, flag, tmp_path, monkeypatch, capsys):
    # As a non-root user these wrote their results file last: a read-only folder was said only once both sides had
    # been read (clamp2_eval: encoded from raw files) and the metrics computed.
    from conftest import load_script

    write_query_and_reference_features(tmp_path, "abc")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    deny_access(monkeypatch, read_only, os.W_OK)
    target = read_only / "out.jsonl"
    with pytest.raises(SystemExit) as exit:
        load_script(script).main([str(tmp_path / "q"), str(tmp_path / "r"), flag, str(target), "--no_progress"])
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and not out and not target.exists()
    last = err.splitlines()[-1]
    assert last.startswith("error: cannot write ") and err.count("error") == 1, err
    assert last.endswith(f" file {target}: {read_only} is not writable; pass another path"), err


def test_a_search_folder_that_can_be_searched_but_not_listed_is_named_with_what_to_do(tmp_path, monkeypatch):
    # chmod 300 (as a non-root user): clamp2_search.py and clamp2_eval.py said only "[Errno 13] Permission denied:
    # 'music'", from the iterdir that follows find_files (which leaves the folder's own listing error out).
    from clamp2.search.raw_files import load_collection

    folder = tmp_path / "music"
    folder.mkdir()
    (folder / "a.abc").write_text("X:1\nK:C\nC\n")
    unlistable(monkeypatch, "music")
    deny_access(monkeypatch, folder, os.R_OK)
    with pytest.raises(ValueError, match=f"^cannot read folder {folder}: permission denied \\(it cannot be listed\\); "
                                         "fix its permissions$"):
        load_collection(folder, lambda: pytest.fail("the model is not needed to say so"))


@pytest.mark.parametrize("script", ["semantic_search/clamp3_eval.py", "semantic_search/clamp3_score.py"])
def test_a_read_only_clamp3_output_folder_is_refused_before_the_work(script, tmp_path, monkeypatch, capsys):
    # As a non-root user: "Error: cannot write ro/retrieval_ranks.jsonl: Permission denied", exit 1, once both sides
    # had been encoded and ranked.
    from conftest import load_script

    write_query_and_reference_features(tmp_path, "ab")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    deny_access(monkeypatch, read_only, os.W_OK)
    with pytest.raises(SystemExit) as exit:
        load_script(script).main([str(tmp_path / "q"), str(tmp_path / "r"), "--output_dir", str(read_only),
                                  "--no_progress"])
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and not out and not list(read_only.iterdir())
    assert err == f"error: cannot write output folder {read_only}: {read_only} is not writable; pass another path\n"


def test_probe_inference_refuses_a_read_only_output_first_and_names_an_unreadable_feature(tmp_path, monkeypatch,
                                                                                         capsys):
    # As a non-root user inference_cls.py said a read-only output folder only once every file was classified, and
    # called a chmod 000 feature file "cannot read it as a .npy array ([Errno 13] Permission denied: ...)".
    from conftest import load_script, run_main
    from probe_features import class_means, write_features

    write_features(tmp_path / "f", class_means(["folk", "jazz"], dim=8, separation=0.35, seed=3), 4, seed=1)
    assert run_main(load_script("music_classification/train_cls.py"),
                    ["--train_folders", tmp_path / "f", "--weights", tmp_path / "p.pth", "--epochs", "1",
                     "--hidden_size", "8", "--no_progress"], capsys)[0] == 0
    inference = load_script("music_classification/inference_cls.py")
    read_only, locked = tmp_path / "ro", tmp_path / "f" / "folk_0000.npy"
    read_only.mkdir()
    access, real_open = os.access, open

    def refusing_open(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == read_only and mode & os.W_OK
                        else access(path, mode, **kw))
    monkeypatch.setattr("builtins.open", refusing_open)
    code, out, err = run_main(inference, [tmp_path / "f", read_only / "p.json", "--weights", tmp_path / "p.pth",
                                          "--no_progress"], capsys)
    assert code == 2 and not out and not list(read_only.iterdir())
    target = read_only / "p.json"
    assert err == f"error: cannot write output file {target}: {read_only} is not writable; pass another path\n"
    code, out, err = run_main(inference, [tmp_path / "f", tmp_path / "p.json", "--weights", tmp_path / "p.pth",
                                          "--no_progress"], capsys)
    assert code == 1 and f"{locked}: cannot read the file: Permission denied" in err and "Errno" not in err, err


def refuse_writing_when_read_only(monkeypatch, read_only: set):
    """A file of ``read_only`` (while it exists) may not be opened for writing, nor is it writable to
    ``os.access``: a chmod 444 file as a non-root user, which root may always write. Removed and created anew, it
    may be written."""
    import builtins

    access, real_open = os.access, builtins.open

    def refusing_open(path, mode="r", *args, **kwargs):
        if Path(path) in read_only and os.path.exists(path) and any(c in mode for c in "wa+"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) in read_only and os.path.exists(
        path) and mode & os.W_OK else access(path, mode, **kw))
    monkeypatch.setattr(builtins, "open", refusing_open)


def test_read_only_logs_of_an_earlier_run_are_replaced_not_a_traceback(tmp_path, monkeypatch, capsys):
    # As a non-root user, batch_*.py (--overwrite or not) and gpt4_summarize.py ended in a PermissionError traceback
    # when the failure or warnings log of an earlier run was read-only (cp -p from an archive); outputs were replaced.
    from clamp2.convert.batch_runner import convert_folder
    from clamp2.convert.summarize import summarize_folder

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a")
    logs = {tmp_path / "out" / f"{kind}_t.log" for kind in ("failed", "warnings")}
    logs.add(tmp_path / "sums" / "failed_summaries.log")
    for log in logs:
        log.parent.mkdir(exist_ok=True)
        log.write_text("old\tline\n")
    refuse_writing_when_read_only(monkeypatch, logs)
    assert convert_folder(tmp_path / "in", tmp_path / "out", convert=Path.read_text, extensions=[".txt"],
                          output_suffix=".out", tool="t", workers=1, progress=False) == 0
    assert (tmp_path / "out" / "a.out").read_text() == "a"
    counts = summarize_folder(tmp_path / "in", tmp_path / "sums", client=None, model="m", languages=["German"],
                              progress=False)  # no .json inputs: no request is sent, the log is still rewritten
    assert not counts.failed and "Traceback" not in capsys.readouterr().err
    assert all(log.read_text() == "" for log in logs)


def test_summary_tools_say_an_unlistable_input_or_unwritable_output_folder_before_any_request(tmp_path, monkeypatch,
                                                                                               capsys):
    # As a non-root user: a summaries/input folder at chmod 000 or 300 was "no .json files under" (merge_jsonl.py,
    # gpt4_summarize.py); gpt4_summarize.py's output folder under a read-only parent a PermissionError traceback.
    from conftest import load_script

    locked, read_only = tmp_path / "locked", tmp_path / "ro"
    for folder in (locked, read_only, tmp_path / "free"):
        folder.mkdir()
    (locked / "a.json").write_text("{}")
    (tmp_path / "free" / "a.json").write_text('{"title": "a", "filepaths": ["a.abc"]}')
    access = os.access
    refused = {(locked, os.R_OK), (read_only, os.W_OK)}
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if any(
        Path(path) == folder and mode & bit for folder, bit in refused) else access(path, mode, **kw))
    unlistable(monkeypatch, "locked")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key-0123456789")
    merge, summarize = (load_script(f"process_data/{name}.py").main for name in ("merge_jsonl", "gpt4_summarize"))
    unlisted = f"cannot read {{}} folder {locked}: permission denied (it cannot be listed); fix its permissions"
    assert merge([str(locked), str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: {unlisted.format('summaries')}\n"
    assert summarize([str(locked), str(tmp_path / "out"), "--model", "m"]) == 2
    assert capsys.readouterr().err == f"error: {unlisted.format('input')}\n"
    assert summarize([str(tmp_path / "free"), str(read_only / "out"), "--model", "m", "--base_url",
                      "http://127.0.0.1:9/v1"]) == 2
    assert capsys.readouterr().err == (f"error: cannot write output folder {read_only / 'out'}: {read_only} is not "
                                       "writable; pass another path\n")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "out").exists() and not list(read_only.iterdir())


def test_a_quickstart_step_refused_a_write_in_its_working_folder_is_one_line(tmp_path, monkeypatch, capsys):
    # As a non-root user, a re-run of quickstart.py --tiny whose plots/ folder was read-only (chmod 555) ended in a
    # PermissionError traceback at its last step (the report's plots).
    from clamp2.files import atomic_write_bytes
    from clamp2.quickstart.pipeline import Quickstart, Settings

    plots = tmp_path / "plots"
    plots.mkdir()
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)
    run.steps = lambda: [("corpus", lambda: None), ("report", lambda: atomic_write_bytes(plots / "curves.png", b""))]
    refuse_under(monkeypatch, plots, "open")
    assert run.run() == 1
    err = capsys.readouterr().err
    assert err == (f"quickstart: step 2 (report) failed: cannot write {plots / 'curves.png'}: Permission denied "
                   "(cannot create a file in its folder); fix its permissions and run the same command again: finished "
                   "steps are kept\n"), err


def test_a_writable_log_in_a_folder_this_user_may_not_write_is_appended_to(tmp_path, monkeypatch):
    # The log is appended to in place: a log file made beforehand in a folder this user may not write to (or
    # /dev/null, in /dev) was refused before training, though every epoch's append would have worked.
    from clamp2.training.loop import append_log, log_problem

    folder = tmp_path / "group_folder"
    folder.mkdir()
    log = folder / "log.txt"
    log.write_text("")
    deny_access(monkeypatch, folder, os.W_OK)
    assert log_problem(log) is None
    append_log(log, 1, 0.5, 0.25)
    assert log.read_text().startswith("Epoch 1\n")
    # A new log there cannot be made: one line, saying once what to do.
    assert log_problem(folder / "new.txt") == (f"cannot write log file {folder / 'new.txt'}: {folder} is not "
                                               "writable; pass another path")
    assert log_problem(folder) == f"log file {folder} is a folder; pass a file path"


UNLISTABLE_FOLDER = [
    ("semantic_search/clamp3_eval.py", lambda folder, free: [folder, free]),
    ("semantic_search/clamp3_score.py", lambda folder, free: [free, folder]),
    ("semantic_search/clamp3_search.py", lambda folder, free: [free / "q.abc", folder]),
    ("semantic_search/clamp3_embd.py", lambda folder, free: [folder, free / "out"]),
    ("semantic_search/clamp2_eval.py", lambda folder, free: [folder, free]),
]


@pytest.mark.parametrize("script, argv", UNLISTABLE_FOLDER, ids=[s.split("/")[1] for s, _ in UNLISTABLE_FOLDER])
def test_a_folder_this_user_may_not_list_is_one_usage_line(script, argv, tmp_path, monkeypatch, capsys):
    # chmod 000 and chmod 300 on a raw-music folder ended differently (exit 1 calling it a "feature folder or
    # index", or exit 2), after the model family was set up; now one usage line before any work, for both.
    from conftest import load_script

    folder, free = tmp_path / "music", tmp_path / "free"
    folder.mkdir()
    free.mkdir()
    (free / "q.abc").write_text("X:1\nK:C\nC\n")
    main = load_script(script).main
    deny_access(monkeypatch, folder, os.R_OK)
    try:
        status = main([str(arg) for arg in argv(folder, free)])
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert any(f"cannot read {what} {folder}: permission denied (it cannot be listed)" in err
               for what in ("folder", "input folder")), err


def test_build_index_on_a_folder_it_may_list_but_not_search_says_permission_denied(tmp_path, monkeypatch):
    # chmod 600: the names are listed, every stat fails. It said "cannot read its size and modification time"
    # without the reason.
    import numpy as np

    from clamp2.search.feature_store import FeatureError, build_index

    (tmp_path / "f").mkdir()
    for i in range(2):
        np.save(tmp_path / "f" / f"k{i}.npy", np.ones((1, 4), np.float32))
    refuse_under(monkeypatch, tmp_path / "f")
    with pytest.raises(FeatureError, match=r"none of its 2 \.npy files is usable \(first: .*k0\.npy: cannot read its "
                                           r"size and modification time: Permission denied\)"):
        build_index(tmp_path / "f", tmp_path / "index", progress=False)
