"""Every script, pointed at the wrong thing, says so in one line and exits 1 or 2: never a traceback.

One row of ``CASES`` per mistake: the script, its arguments and environment, the exit status and a
fragment of the line it must print. ``{name}`` in an argument or a value is a path of ``WORLD``
(files of the wrong kind, built once) or ``vec`` (the conformance vectors). A usage or
configuration error (exit 2) must be exactly one line on stderr; a batch with a bad file (exit 1)
names that file and still does the rest. Scripts run in this process (``main(argv)``), except rows
marked ``subprocess`` (what happens at start-up, or needs a fresh environment). A new script's
mistakes are new rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pytest

from conftest import REPO_ROOT, VECTORS, load_script

# The conformance vectors' tiny config (tests/data/README.md).
TINY = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "2", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
        "CLAMP2_HIDDEN_SIZE": "48", "MAX_TEXT_LENGTH": "16"}
# The CLaMP 3 vectors' tiny config (tests/data/vectors_clamp3/README.md).
TINY3 = dict(TINY, CLAMP3_HIDDEN_SIZE="48", AUDIO_HIDDEN_SIZE="64", AUDIO_NUM_LAYERS="2", MAX_AUDIO_LENGTH="4")
OFFLINE = {"HF_HUB_OFFLINE": "1"}
NO_HUB = "clamp2-tests/no-such-model"  # a hub id that is in no cache
CLOSED_PORT = "http://127.0.0.1:9"  # a hub endpoint that refuses connections, as a machine without network


@dataclass
class Case:
    script: str
    args: Tuple[str, ...]
    status: int
    says: str
    env: Dict[str, str] = field(default_factory=dict)
    subprocess: bool = False
    seconds: Optional[float] = None  # the most it may take (subprocess rows: start-up included)
    known: str = ""  # a known gap, fixed elsewhere: the row is expected to fail (strictly) until then

    def __str__(self):
        changed = [f"{k}={v}" for k, v in self.env.items() if TINY.get(k) != v]
        return " ".join([Path(self.script).stem, *(a.replace("{vec}/", "") for a in self.args), *changed])


def case(script, *args, status=2, says="", env=None, **options) -> Case:
    return Case(script, args, status, says, dict(env or {}), **options)


X3, XC2 = "code/extract_m3.py", "code/extract_clamp2.py"
TM3, TC2, QS = "code/train_m3.py", "code/train_clamp2.py", "code/quickstart.py"
M3W, C2W, TEXT = "--weights={vec}/tiny_m3.pth", "--weights={vec}/tiny_clamp2.pth", "--text_model={vec}/tiny_text_model"
IN = "{vec}/extract_in"
SS = "semantic_search/"
MC = "music_classification/"
PD = "process_data/"
X3C, MERT = "code/extract_clamp3.py", "process_data/extract_mert.py"
TS3, TA3 = "code/train_clamp3_symbolic.py", "code/train_clamp3_audio.py"
C3W, TEXT3 = "--weights={vec3}/tiny_clamp3.pth", "--text_model={vec}/tiny_text_model"
IN3, TINY_MERT = "{vec3}/extract_in", "--model={vec3}/tiny_mert"
C3 = ("--weights={vec3}/tiny_clamp3.pth", "--text_model={vec}/tiny_text_model", "--mert={vec3}/tiny_mert", "--no_cache")

CASES = [
    # -- checkpoints of the wrong kind ---------------------------------------------------------
    case(X3, IN, "{tmp}/o", "--weights={text_file}", says="it is a text file, not a PyTorch checkpoint", env=TINY),
    case(X3, IN, "{tmp}/o", "--weights={empty_file}", says="the file is empty", env=TINY),
    case(X3, IN, "{tmp}/o", "--weights={npy_file}", says="it is a NumPy array (.npy), not a PyTorch checkpoint", env=TINY),
    case(X3, IN, "{tmp}/o", "--weights={truncated}", says="the file is damaged or incomplete", env=TINY),
    case(X3, IN, "{tmp}/o", C2W, says="is a CLaMP 2 checkpoint; expected an M3 checkpoint", env=TINY),
    case(X3, IN, "{tmp}/o", "--weights={probe}", says="is a linear probe checkpoint; expected an M3", env=TINY),
    case(X3, IN, "{tmp}/o", "--weights={tmp}", says="is a folder", env=TINY),
    case(X3, IN, "{tmp}/o", "--weights={tmp}/weights_m3.pth", says="weights_m3.pth is not a published file of the Hugging Face repo sander-wood/clamp2", env=TINY),
    case(X3, IN, "{tmp}/o", M3W, says="M3_HIDDEN_SIZE", env=dict(TINY, M3_HIDDEN_SIZE="128")),
    case(XC2, IN, "{tmp}/o", M3W, TEXT, says="is an M3 checkpoint; expected a CLaMP 2 checkpoint", env=TINY),
    case(XC2, IN, "{tmp}/o", "--weights={text_file}", TEXT, says="it is a text file", env=TINY),
    case(XC2, IN, "{tmp}/o", "--weights={evil}", TEXT, says="Python objects other than tensors", env=TINY),
    # -- hub ids without network ---------------------------------------------------------------
    case(XC2, IN, "{tmp}/o", C2W, f"--text_model={NO_HUB}", says=f"`hf download {NO_HUB}`", env=dict(TINY, **OFFLINE)),
    case(XC2, IN, "{tmp}/o", C2W, f"--text_model={NO_HUB}", says="the hub cannot be reached", seconds=10,
         env=dict(TINY, HF_ENDPOINT=CLOSED_PORT)),
    case(SS + "clamp2_search.py", "a jig", "{feats}", f"--weights={NO_HUB}", TEXT, says=f"hf download {NO_HUB}",
         env=dict(TINY, **OFFLINE)),
    case(SS + "clamp2_search.py", "a jig", IN, f"--weights={NO_HUB}", TEXT, says="the hub cannot be reached",
         seconds=10, env=dict(TINY, HF_ENDPOINT=CLOSED_PORT)),
    # -- settings out of range or of the wrong type --------------------------------------------
    case(X3, IN, "{tmp}/o", M3W, "--batch_size=0", says="--batch_size", env=TINY),
    case(X3, IN, "{tmp}/o", M3W, says="PATCH_LENGTH", env=dict(TINY, PATCH_LENGTH="0")),
    case(X3, IN, "{tmp}/o", M3W, says="PATCH_SIZE=-4", env=dict(TINY, PATCH_SIZE="-4")),
    case(X3, IN, "{tmp}/o", M3W, says="expected an integer", env=dict(TINY, PATCH_SIZE="big")),
    case(X3, IN, "{tmp}/o", M3W, "--dtype=fp8", says="invalid choice", env=TINY),
    case(X3, IN, "{tmp}/o", M3W, "--device=tpu9", says="--device 'tpu9' is not a torch device", env=TINY),
    case(XC2, IN, "{tmp}/o", C2W, TEXT, says="MAX_TEXT_LENGTH", env=dict(TINY, MAX_TEXT_LENGTH="64")),
    case(XC2, IN, "{tmp}/o", C2W, TEXT, says="MAX_TEXT_LENGTH", env=dict(TINY, MAX_TEXT_LENGTH="0")),
    case(XC2, IN, "{tmp}/o", C2W, "--text_model={text_file}", says="it is a file, not a folder", env=TINY),
    case(XC2, IN, "{tmp}/o", C2W, "--text_model={tmp}", says="it has no config.json", env=TINY),
    case(TM3, "--train_folders={empty_dir}", says="no .abc or .mtf files under", env=TINY),
    case(TM3, "--train_folders={text_file}", says="text.pth is a file, not a folder", env=TINY),
    case(TM3, "--train_folders={vec}/extract_in", says="M3_BATCH_SIZE", env=dict(TINY, M3_BATCH_SIZE="0")),
    case(TM3, "--train_folders={vec}/extract_in", says="M3_MASK_RATIO", env=dict(TINY, M3_MASK_RATIO="1.5")),
    case(TM3, "--train_folders={vec}/extract_in", says="M3_LEARNING_RATE", env=dict(TINY, M3_LEARNING_RATE="-1")),
    case(TM3, "--train_folders={vec}/extract_in", says="EVAL_SPLIT", env=dict(TINY, EVAL_SPLIT="2")),
    case(TM3, "--train_folders={vec}/extract_in", says="CLAMP3_VARIANT", env=dict(TINY, CLAMP3_VARIANT="big")),
    case(TC2, "--train_jsonl={tmp}/missing.jsonl", says="missing.jsonl", env=TINY),
    case(TC2, "--train_jsonl={text_file}", says="text.pth", env=TINY),
    case(TC2, "--train_jsonl={jsonl}", "--text_model={vec}/tiny_text_model", says="MAX_TEXT_LENGTH",
         env=dict(TINY, MAX_TEXT_LENGTH="200")),
    case(QS, "--per_collection=0", says="--per_collection"),
    case(QS, "--m3_epochs=-1", says="--m3_epochs"),
    # published models that cannot load: said before the corpus is built, not at the features step
    case(QS, "--out={tmp}/q", "--weights={tmp}/absent.pth", "--text_model={vec}/tiny_text_model",
         says="--weights {tmp}/absent.pth: no such file; it takes the published CLaMP 2 weights file", seconds=20),
    case(QS, "--out={tmp}/q", "--weights={text_file}", "--text_model={tmp}/no_model", says="text model", seconds=20),
    # -- folders that are files, unwritable outputs, empty inputs ------------------------------
    case(X3, "{text_file}", "{tmp}/o", M3W, says="is a file, not a folder", env=TINY),
    case(X3, "{tmp}/nothing", "{tmp}/o", M3W, says="input folder not found", env=TINY),
    case(X3, "{empty_dir}", "{tmp}/o", M3W, says="no input files", env=TINY),
    case(X3, IN, "{text_file}", M3W, says="text.pth is a file; pass a folder path", env=TINY),
    case(X3, IN, "{text_file}/o", M3W, says="text.pth is a file", env=TINY),
    case(QS, "--nproc=0", says="--nproc", subprocess=True),  # as launched: the script's own start-up
    case(PD + "batch_midi2mtf.py", "{text_file}", "{tmp}/o", says="text.pth"),
    case(PD + "batch_midi2mtf.py", "{vec}/inputs/midi", "{text_file}", says="text.pth"),
    case(PD + "batch_midi2mtf.py", "{vec}/inputs/midi", "{tmp}/o", "--workers=0", says="--workers"),
    case(PD + "batch_abc2xml.py", "{empty_dir}", "{tmp}/o", says="no"),
    case(PD + "batch_xml2abc.py", "{tmp}/nothing", "{tmp}/o", says="nothing"),
    case(PD + "merge_jsonl.py", "{tmp}/nothing", "{tmp}/o.jsonl", says="nothing"),
    case(PD + "merge_jsonl.py", "{summaries}", "{empty_dir}", says="empty_dir is a folder; pass a file path"),
    case(PD + "gpt4_summarize.py", "{summaries}", "{tmp}/o", "--model=m", says="OPENAI_API_KEY",
         env={"OPENAI_API_KEY": ""}),
    case(PD + "gpt4_summarize.py", "{summaries}", "{tmp}/o", "--model=m", "--workers=0", says="--workers"),
    # -- batches: the bad file is named, the rest is done ----------------------------------------
    case(X3, "{mixed}", "{tmp}/o", M3W, status=1, says="broken.mtf", env=TINY),
    case(XC2, "{mixed}", "{tmp}/o", C2W, TEXT, status=1, says="latin1.txt", env=TINY),
    case(PD + "batch_mtf2midi.py", "{mixed}", "{tmp}/o", status=1, says="broken.mtf"),
    # -- search, metrics, probes ---------------------------------------------------------------
    case(SS + "semantic_search.py", "{text_file}", "{feats}", says="text.pth"),
    case(SS + "semantic_search.py", "{feats}/a_jig.npy", "{tmp}/nothing", says="nothing"),
    case(SS + "semantic_search.py", "{feats}/a_jig.npy", "{feats}", "--top_k=-1", says="--top_k"),
    case(SS + "semantic_search.py", "{mert_like}", "{feats}", says="mert_like.npy"),
    case(SS + "semantic_search_metrics.py", "{feats}", "{empty_dir}", says="empty_dir"),
    case(SS + "build_index.py", "{tmp}/nothing", "{tmp}/idx", says="nothing"),
    case(SS + "clamp2_score.py", "{feats}", "{text_file}", says="text.pth"),
    case(SS + "clamp2_fmd.py", "{feats}", "{feats}", "--inf", "--min_n=1", says="--min_n"),
    case(SS + "clamp2_search.py", "a jig", IN, "--weights={text_file}", TEXT, says="it is a text file", env=TINY),
    case(SS + "clamp2_search.py", "a jig", IN, M3W, TEXT, says="is an M3 checkpoint", env=TINY),
    case(SS + "clamp2_search.py", "a jig", IN, "--top_k=0", says="--top_k", env=TINY),
    case(SS + "clamp2_search.py", "a jig", IN, C2W, TEXT, "--no_cache", says="MAX_TEXT_LENGTH=64",
         env=dict(TINY, MAX_TEXT_LENGTH="64")),
    case(SS + "clamp3_search.py", "{vec3}/inputs/txt/multi.txt", IN3 + "/abc", *C3, says="MAX_TEXT_LENGTH=64",
         env=dict(TINY3, MAX_TEXT_LENGTH="64")),
    case(SS + "build_index.py", "{feats}", "{text_file}", says="text.pth"),
    case(SS + "clamp2_eval.py", IN + "/txt", IN + "/abc", "--weights={probe}", TEXT,
         says="is a linear probe checkpoint; expected a CLaMP 2", env=TINY),
    case(SS + "zero_shot.py", IN, "--labels=jig,reel", "--weights={text_file}", TEXT, "--output={tmp}/z.json",
         says="it is a text file", env=TINY),
    case(SS + "zero_shot.py", "{text_file}", "--labels=jig,reel", says="text.pth", env=TINY),
    case(MC + "inference_cls.py", "{feats}", "{tmp}/p.json", C2W, says="is a CLaMP 2 checkpoint; expected a linear probe"),
    case(MC + "inference_cls.py", "{feats}", "{tmp}/p.json", "--weights={vec3}/tiny_clamp3.pth",
         says="is a CLaMP 3 checkpoint; expected a linear probe"),
    case(MC + "inference_cls.py", "{feats}", "{tmp}/p.json", "--weights={text_file}", says="it is a text file"),
    case(MC + "inference_cls.py", "{feats}", "{tmp}/p.json", "--weights={probe}", "--batch_size=0", says="--batch_size"),
    case(MC + "train_cls.py", "--train_folders={text_file}", "--weights={tmp}/p.pth", says="text.pth"),
    case(MC + "train_cls.py", "--train_folders={feats}", "--weights={tmp}/p.pth", "--epochs=0", says="--epochs"),
    case(MC + "train_cls.py", "--train_folders={feats}", "--weights={tmp}/p.pth", "--batch_size=0", says="--batch_size"),
    case(MC + "train_cls.py", "--train_folders={mert_dir}", "--weights={tmp}/p.pth", says="[13, 2, 768]: expected [1, L, D]"),
    # -- CLaMP 3 and audio ---------------------------------------------------------------------
    case(X3C, IN3, "{tmp}/o", C2W, TEXT3, says="is a CLaMP 2 checkpoint; expected a CLaMP 3", env=TINY3),
    case(X3C, IN3, "{tmp}/o", M3W, TEXT3, says="is an M3 checkpoint; expected a CLaMP 3", env=TINY3),
    case(X3C, IN3, "{tmp}/o", "--weights={text_file}", TEXT3, says="it is a text file", env=TINY3),
    case(X3C, IN3, "{tmp}/o", "--variant=c2", TEXT3, status=1, says="hf download sander-wood/clamp3 weights_clamp3_c2",
         env=TINY3),  # SPEC_CLAMP3 §14: exit 1
    case(X3C, IN3, "{tmp}/o", "--variant=big", TEXT3, says="invalid choice", env=TINY3),
    case(X3C, IN3, "{tmp}/o", C3W, TEXT3, says="CLAMP3_VARIANT", env=dict(TINY3, CLAMP3_VARIANT="big")),
    case(X3C, IN3, "{tmp}/o", C3W, TEXT3, says="AUDIO_HIDDEN_SIZE", env=dict(TINY3, AUDIO_HIDDEN_SIZE="32")),
    case(X3C, IN3, "{tmp}/o", C3W, TEXT3, says="MAX_AUDIO_LENGTH", env=dict(TINY3, MAX_AUDIO_LENGTH="0")),
    case(X3C, IN3, "{tmp}/o", C3W, TEXT3, says="does not fit the model", env=dict(TINY3, AUDIO_NUM_LAYERS="3")),
    case(X3C, IN3, "{tmp}/o", C3W, TEXT3, "--batch_size=0", says="--batch_size", env=TINY3),
    case(X3C, "{text_file}", "{tmp}/o", C3W, TEXT3, says="is a file, not a folder", env=TINY3),
    case(X3C, IN3, "{text_file}", C3W, TEXT3, says="text.pth is a file", env=TINY3),
    case(X3C, "{bad_mert}", "{tmp}/o", C3W, TEXT3, status=1, says="double.npy", env=TINY3),
    case(MERT, "{vec3}/inputs/audio", "{tmp}/o", "--model={text_file}", says="text.pth"),
    case(MERT, "{vec3}/inputs/audio", "{tmp}/o", "--model={empty_dir}", says="empty_dir"),
    case(MERT, "{vec3}/inputs/audio", "{tmp}/o", "--model={vec3}/tiny_clamp3.pth", says="tiny_clamp3.pth"),
    case(MERT, "{vec3}/inputs/audio", "{tmp}/o", f"--model={NO_HUB}", says=f"hf download {NO_HUB}", env=OFFLINE),
    case(MERT, "{vec3}/inputs/audio", "{tmp}/o", TINY_MERT, "--batch_size=0", says="--batch_size"),
    case(MERT, "{vec3}/inputs/audio", "{tmp}/o", TINY_MERT, "--device=tpu9", says="tpu9"),
    case(MERT, "{text_file}", "{tmp}/o", TINY_MERT, says="is a file, not a folder"),
    case(MERT, "{empty_dir}", "{tmp}/o", TINY_MERT, says="no"),
    case(MERT, "{bad_audio}", "{tmp}/o", TINY_MERT, status=1, says="not_audio.wav"),
    case(TS3, "--train_jsonl={tmp}/missing.jsonl", TEXT3, says="missing.jsonl", env=TINY3),
    case(TS3, "--train_jsonl={text_file}", TEXT3, says="text.pth", env=TINY3),
    case(TS3, "--train_jsonl={jsonl}", TEXT3, "--variant=big", says="invalid choice", env=TINY3),
    case(TA3, "--train_jsonl={audio_jsonl}", TEXT3, says="[13, 2, 64]", env=TINY3),
    case(TA3, "--train_jsonl={audio_jsonl}", TEXT3, says="SAVE_EVERY", env=dict(TINY3, SAVE_EVERY="-1")),
    case(SS + "clamp3_search.py", "{text_file}", IN3 + "/abc", *C3, status=1, says="Could not determine query modality",
         env=TINY3),
    case(SS + "clamp3_search.py", "{tmp}/nothing.txt", IN3 + "/abc", *C3, says="nothing.txt", env=TINY3),
    case(SS + "clamp3_search.py", "{vec3}/inputs/txt/multi.txt", IN3 + "/abc", C2W, TEXT3, "--no_cache",
         says="is a CLaMP 2 checkpoint; expected a CLaMP 3", env=TINY3),
    case(SS + "clamp3_search.py", "{vec3}/inputs/txt/multi.txt", IN3 + "/abc", *C3, "--top_k=-1", says="--top_k",
         env=TINY3),
    case(SS + "clamp3_score.py", IN3, "{vec3}/inputs/txt", *C3, "--output_dir={tmp}/s", status=1, says="modalit",
         env=TINY3),
    case(SS + "clamp3_eval.py", "{vec3}/inputs/txt", "{text_file}", *C3, "--output_dir={tmp}/e", status=1,
         says="Could not determine reference modality", env=TINY3),
    case(SS + "clamp3_embd.py", "{vec3}/inputs/audio", "{tmp}/emb", "--weights={vec3}/tiny_clamp3.pth", TEXT3,
         "--mert={empty_dir}", "--no_cache", status=1, says="empty_dir", env=TINY3),
    case(SS + "zero_shot.py", IN3 + "/abc", "--labels=jig,chorale", "--model=clamp3", C2W, TEXT3, "--no_cache",
         "--output={tmp}/z3.json", says="is a CLaMP 2 checkpoint; expected a CLaMP 3", env=TINY3),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Dict[str, str]:
    """Files and folders of the wrong kind, shared by every row (rows never write into them)."""
    import torch

    from clamp2.probe.model import LinearProbe

    root = tmp_path_factory.mktemp("world")
    paths = {"vec": str(VECTORS), "vec3": str(VECTORS.parent / "vectors_clamp3")}

    def put(name, data: bytes = b""):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    paths["text_file"] = put("text.pth", b"these are not weights\n")
    paths["empty_file"] = put("empty.pth")
    paths["truncated"] = put("truncated.pth", (VECTORS / "tiny_m3.pth").read_bytes()[:4000])
    (root / "empty_dir").mkdir()
    paths["empty_dir"] = str(root / "empty_dir")
    np.save(root / "array.npy", np.zeros(3, dtype=np.float32))
    paths["npy_file"] = str(root / "array.npy")

    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"model": Payload()}, root / "evil.pth")
    paths["evil"] = str(root / "evil.pth")
    torch.save({"model": LinearProbe(64, 2, 8).state_dict()}, root / "probe.pth")
    paths["probe"] = str(root / "probe.pth")
    # global features [1, 64]; a MERT-shaped [13, n, 768] array where a feature belongs
    rng = np.random.default_rng(0)
    for name in ("a_jig", "b_reel", "c_jig", "d_reel"):
        put(f"feats/{name}.npy")
        np.save(root / "feats" / f"{name}.npy", rng.standard_normal((1, 64)).astype(np.float32))
    paths["feats"] = str(root / "feats")
    np.save(root / "mert_like.npy", np.zeros((13, 2, 768), dtype=np.float32))
    paths["mert_like"] = str(root / "mert_like.npy")
    (root / "mert_dir").mkdir()
    shutil.copy(root / "mert_like.npy", root / "mert_dir" / "jig_mert_like.npy")
    np.save(root / "mert_dir" / "jig_a.npy", rng.standard_normal((1, 64)).astype(np.float32))
    paths["mert_dir"] = str(root / "mert_dir")
    # a batch with one good and one bad file of each kind
    mixed = root / "mixed"
    shutil.copytree(VECTORS / "extract_in", mixed)
    put("mixed/mtf/broken.mtf", b"\xff\xfe not MTF at all")
    put("mixed/txt/latin1.txt", "caf\xe9 tune".encode("latin-1"))
    paths["mixed"] = str(mixed)
    put("summaries/a.json", b'{"title": "x"}')
    paths["summaries"] = str(root / "summaries")
    pieces = ["abc/bwv10.7.abc", "abc/airds_tune3.abc", "mtf/bwv10.7.mtf", "mtf/handmade.mtf"]
    put("pairs.jsonl", "".join(json.dumps({"summary_en": f"piece {n}", "summary_nen": {"language": "German", "summary": f"Stück {n}"},
                                           "filepaths": [f"mixed/{p}"]})
                               + "\n" for n, p in enumerate(pieces)).encode())
    paths["jsonl"] = str(root / "pairs.jsonl")
    # CLaMP 3: MERT features of the wrong kind beside a good one; audio that is not audio
    vectors3 = VECTORS.parent / "vectors_clamp3"
    bad_mert = root / "bad_mert"
    shutil.copytree(vectors3 / "extract_in" / "audio", bad_mert)
    np.save(bad_mert / "double.npy", np.zeros((1, 2, 64)))
    np.save(bad_mert / "all_layers.npy", np.zeros((3, 2, 64), dtype=np.float32))
    paths["bad_mert"] = str(bad_mert)
    bad_audio = root / "bad_audio"
    shutil.copytree(vectors3 / "inputs" / "audio", bad_audio)
    put("bad_audio/not_audio.wav", b"RIFF this is text\n")
    paths["bad_audio"] = str(bad_audio)
    put("audio_pairs/all_layers.npy")
    np.save(root / "audio_pairs" / "all_layers.npy", np.zeros((13, 2, 64), dtype=np.float32))
    put("audio_pairs/pairs.jsonl", "".join(json.dumps({"analysis": f"piece {n}", "filepaths": ["all_layers.npy"]}) + "\n"
                                           for n in range(4)).encode())
    paths["audio_jsonl"] = str(root / "audio_pairs" / "pairs.jsonl")
    return paths


_modules: dict = {}


def script_module(relative_path: str):
    if relative_path not in _modules:
        _modules[relative_path] = load_script(relative_path)
    return _modules[relative_path]


def clean_environment(env: Dict[str, str]) -> Dict[str, str]:
    from clamp2.configuration import RESERVED_PREFIXES

    config_names = {line.split("=")[0].strip() for line in (REPO_ROOT / "code" / "config.py").read_text().splitlines()
                    if line[:1].isupper() and "=" in line}
    environ = {k: v for k, v in os.environ.items() if not k.startswith(RESERVED_PREFIXES) and k not in config_names}
    environ.update(env)
    return environ


def run_in_process(case: Case, argv, env, monkeypatch, capsys) -> Tuple[int, str, str]:
    for name, value in clean_environment(env).items():
        monkeypatch.setenv(name, value)
    for name in set(os.environ) - set(clean_environment(env)):
        monkeypatch.delenv(name)
    if "HF_ENDPOINT" in env:  # read once, at import, by huggingface_hub
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", env["HF_ENDPOINT"])
    module = script_module(case.script)
    capsys.readouterr()
    try:
        status = module.main(argv)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def run_subprocess(case: Case, argv, env, cwd) -> Tuple[int, str, str]:
    environ = clean_environment(env)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(REPO_ROOT / case.script), *argv], env=environ, cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout, result.stderr


# Lines a script may print besides its error: the settings it runs with, progress, the files it skipped.
REPORT = re.compile(r"(config overrides from the environment|settings changed from code/config.py[^:]*|warning: ignoring"
                    r"|skipped|failed): |[^:]*: +\d+%\|")
ERROR = re.compile(r"^(\S+: )?error\b")


def report_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.strip() and not REPORT.match(line)]


@pytest.mark.parametrize("row", [pytest.param(row, marks=pytest.mark.xfail(strict=True, reason=row.known))
                                 if row.known else row for row in CASES], ids=str)
def test_mistake_is_one_line(row: Case, world, tmp_path, monkeypatch, capsys):
    paths = dict(world, tmp=str(tmp_path))
    argv = [arg.format(**paths) for arg in row.args]
    env = {k: v.format(**paths) for k, v in row.env.items()}
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    if row.subprocess:
        status, out, err = run_subprocess(row, argv, env, tmp_path)
    else:
        status, out, err = run_in_process(row, argv, env, monkeypatch, capsys)
    seconds = time.monotonic() - start
    assert "Traceback" not in err + out, err
    assert status == row.status, err
    says = row.says.format(**paths)
    if row.status == 2:
        lines = report_lines(err)
        assert len(lines) == 1 and ERROR.match(lines[0]), err
    assert says in err, err
    if row.seconds is not None:
        assert seconds < row.seconds, f"took {seconds:.1f} s"
