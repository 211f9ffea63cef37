"""Hostile or absurd downloaded inputs: a bounded failure for that file, never an escape, hang or prompt."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from clamp2.convert import abc as abc_convert
from clamp2.convert.mtf import mtf_to_midi, split_tokens


def test_index_manifest_naming_a_file_outside_the_index_is_refused_and_nothing_is_deleted(tmp_path):
    from clamp2.search.feature_store import FeatureError, build_index

    feats, index = tmp_path / "feats", tmp_path / "index"
    feats.mkdir()
    for i in range(3):
        np.save(feats / f"f{i}.npy", np.full((1, 4), i + 1, np.float32))
    build_index(feats, index)
    manifest_path = next(index.glob("*.json"))
    manifest = json.loads(manifest_path.read_text())
    victim = tmp_path / "victim.tsv"
    victim.write_text("someone's file\n")
    (index / manifest["skipped"]).unlink()
    manifest["skipped"] = str(victim)  # an absolute path; "../victim.tsv" is the same
    manifest_path.write_text(json.dumps(manifest))
    np.save(feats / "f9.npy", np.ones((1, 4), np.float32))
    with pytest.raises(FeatureError, match="not a file name in the index folder"):
        build_index(feats, index)
    assert victim.read_text() == "someone's file\n"


def test_split_tokens_joins_a_bracketed_value_once():
    # The reference cuts the line at its brackets (linear); joining piece by piece took minutes for a 2 MB sysex
    # (its speed: benchmarks/bench_process_data.py). The tokens are as before.
    data = ", ".join(["1"] * 1000)
    assert split_tokens(f"0 ({data})") == ["0", f"({data})"]
    assert split_tokens("0 (1, 2") == ["0", "(1, 2"]  # unclosed: the rest of the line, as before
    assert split_tokens("0 (1,  2) 3") == ["0", "(1,  2)", "3"]
    midi = mtf_to_midi("ticks_per_beat 480\nsysex 0 (1, 2, 3)\n")
    assert midi.tracks[0][0].data == (1, 2, 3)


def test_mxl_zip_bomb_is_refused_without_reading_it(tmp_path, monkeypatch):
    monkeypatch.setattr(abc_convert, "MAX_MXL_MEMBER_BYTES", 1 << 20)
    bomb = tmp_path / "bomb.mxl"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("score.xml", b"\0" * (4 << 20))
    with pytest.raises(ValueError, match="expands to more than 1 MiB"):
        abc_convert.xml_to_abc(bomb)


def test_text_model_folder_with_custom_code_is_refused_without_a_prompt(tmp_path, monkeypatch):
    from clamp2.text_model import TextModelUnavailable, max_text_length

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "evilmodel",
                                                      "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")

    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    with pytest.raises(TextModelUnavailable):
        max_text_length(str(tmp_path))
    assert not (tmp_path / "ran").exists()
    assert prompts == []  # transformers asked whether to run the folder's code (a "y" would have run it)
