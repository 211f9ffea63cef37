"""The quick start: real corpus music → a trained CLaMP 2 → retrieval, zero-shot, probe, FMD, report.

Every step runs the project's own scripts (their ``main``, in this process, or under ``torchrun``)
on the files the previous step wrote, exactly as a researcher would run them by hand; this module
only chooses the arguments, collects the printed numbers and draws the report. ``code/quickstart.py``
is its command line.

Steps (each resumable: a finished step is skipped on a re-run with the same settings):

1. corpus — six labelled collections from music21's corpus (:mod:`clamp2.quickstart.demo_corpus`), split by
   piece into train / test (held out), with metadata and descriptions in four languages;
2. convert — MusicXML → ABC, ABC → interleaved ABC, MIDI → MTF (``process_data/``);
3. pairs — metadata + file paths → ``train.jsonl`` / ``test.jsonl`` (``merge_jsonl.py``) and the
   held-out descriptions as ``.txt`` queries;
4. text model — a small XLM-R-architecture encoder with a vocabulary of the training texts (the
   published XLM-R cannot be downloaded here; with ``--weights`` the published one is used);
5. M3 — masked-patch pre-training on the training music (``code/train_m3.py``);
6. CLaMP 2 — contrastive training on the training pairs, from M3 (``code/train_clamp2.py``, under
   ``torchrun`` with ``--nproc`` processes);
7. features — global CLaMP 2 features of held-out texts and music, per-position features for the
   probe (``code/extract_clamp2.py``);
8. evaluate — retrieval (``semantic_search_metrics.py``), zero-shot by prompt (``zero_shot.py``),
   linear probe (``music_classification/train_cls.py``), FMD between collections (``clamp2_fmd.py``);
9. report — ``report.md``, ``metrics.json`` and PNG plots.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ..files import disk_full_error, unwritable
from ..provenance import code_version
from ..progress import plural
from ..workers import ending_with_this_process

# The checkout whose scripts the steps run: the one the package sits in (editable install); code/quickstart.py
# sets its own (a clone whose clamp2 is installed from a wheel).
REPO = Path(__file__).resolve().parents[2]




def _marker_code(marker: Path) -> str:
    try:
        return marker.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""


# Held-out text→music chance level for N candidates: E[1/rank] for a uniformly random rank.


def chance_mrr(n: int) -> float:
    return sum(1.0 / r for r in range(1, n + 1)) / n if n else 0.0


def mrr_summary_line(name: str, values: dict, chance: float) -> str:
    """The summary's line for one retrieval task; no ratio where chance is 0 (no held-out features)."""
    mrr = values.get("MRR", float("nan"))
    ratio = f", {mrr / chance:.1f}x" if chance else ""
    return f"{name} MRR {mrr:.2f} (chance {chance:.2f}{ratio})"


@dataclass
class Settings:
    # Held-out ABC→MTF MRR / chance, last epoch (README): 60 pieces per collection 3.3× after 30 CLaMP 2 epochs,
    # 4.4× after 60; 100 pieces 5.3× after 40, 5.5× after 60. 100 and 50 keep a margin: 10–12 min on 2 cores (README).
    per_collection: int = 100
    m3_epochs: int = 3
    clamp2_epochs: int = 50
    nproc: int = 2
    seed: int = 0
    patch_length: int = 128
    m3_hidden: int = 128
    clamp2_hidden: int = 128
    text_hidden: int = 128
    layers: int = 2
    batch_size: int = 16  # per step, over all processes
    m3_learning_rate: float = 5e-4
    clamp2_learning_rate: float = 5e-4
    # Fixed English descriptions learn faster at this size than the published text dropout (measured on
    # the held-out pieces: MRR 0.27 vs 0.20 after the same steps); --text_dropout restores it.
    text_dropout: bool = False
    probe_epochs: int = 200
    weights: Optional[str] = None  # published CLaMP 2 (skips training)
    text_model: Optional[str] = None

    @classmethod
    def tiny(cls) -> "Settings":
        return cls(per_collection=10, m3_epochs=1, clamp2_epochs=10, patch_length=64, m3_hidden=64,
                   clamp2_hidden=64, text_hidden=64, batch_size=6, probe_epochs=40)


class StepFailed(RuntimeError):
    pass


class SettingsMismatch(ValueError):
    """--out holds a run made with other settings (a usage error: nothing there is reused)."""


# -- running the project's scripts ----------------------------------------------------------------

def load_script(relative: str):
    """A project script as a module, to call its ``main(argv)`` in this process."""
    import importlib.util

    path = REPO / relative
    spec = importlib.util.spec_from_file_location("quickstart_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(relative: str, args: List[str], env: Optional[Dict[str, str]] = None, ok=(0,),
               capture: bool = False) -> str:
    """Run a script's ``main`` with ``env`` overrides; its stdout is echoed (and returned with ``capture``)."""
    from ..training.loop import environment

    buffer = io.StringIO()
    with environment(env or {}):
        with contextlib.redirect_stdout(_Tee(sys.stdout, buffer)) if capture else contextlib.nullcontext():
            try:
                status = load_script(relative).main([str(a) for a in args])
            except SystemExit as exit_:
                status = exit_.code
    status = 0 if status is None else status
    if status not in ok:
        raise StepFailed(f"{relative} exited with status {status} (see its messages above)")
    return buffer.getvalue()


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(relative: str, args: List[str], nproc: int, env: Dict[str, str]) -> None:
    """``torchrun --nproc_per_node=N script args`` with ``env`` (a real multi-process gloo run on CPU)."""
    environ = dict(os.environ, **env)
    if nproc > 1:
        # Two processes on two cores: one thread each, or they fight over the cores.
        environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // nproc))
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={free_port()}", str(REPO / relative)]
    else:
        command = [sys.executable, str(REPO / relative)]
    # Left running after a kill, the training would go on beside a re-run's own, on the same weights and log.
    process = subprocess.Popen(ending_with_this_process(command + [str(a) for a in args]), env=environ)
    try:
        status = process.wait()
    except BaseException:
        # Ctrl-C sent to this process alone: SIGTERM, which torchrun passes on to its ranks before it ends
        # (subprocess.run would SIGKILL it, and its ranks would wait on each other for good).
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if status != 0:
        raise StepFailed(f"{relative} exited with status {status} (see its messages above)")


def metric_lines(text: str) -> Dict[str, float]:
    """``MRR: 0.31`` / ``Hit@10: 0.9`` lines of semantic_search_metrics.py → numbers."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(MRR|Hit@\d+): ([0-9.]+)$", text, flags=re.M)}


# -- the pipeline ---------------------------------------------------------------------------------

class Quickstart:
    def __init__(self, out: Path, settings: Settings, progress: bool = True):
        self.out = out
        self.s = settings
        self.progress = progress
        self.data = out / "data"
        self.features = out / "features"
        self.metrics: dict = {}
        self.timings: Dict[str, float] = {}
        metrics_path = out / "metrics.json"
        if metrics_path.exists():
            previous = json.loads(metrics_path.read_text())
            self.metrics = previous.get("results", {})
            self.timings = previous.get("step_seconds", {})

    # configuration of the small models, as environment overrides of code/config.py
    def model_env(self) -> Dict[str, str]:
        s = self.s
        return {"PATCH_LENGTH": str(s.patch_length), "PATCH_NUM_LAYERS": str(s.layers), "TOKEN_NUM_LAYERS": "1",
                "M3_HIDDEN_SIZE": str(s.m3_hidden), "CLAMP2_HIDDEN_SIZE": str(s.clamp2_hidden),
                "MAX_TEXT_LENGTH": "128", "M3_BATCH_SIZE": str(s.batch_size),
                # CLAMP2_BATCH_SIZE is per process: the global batch (the contrastive negatives) stays the same
                # where --nproc divides it (code/quickstart.py notes when it does not).
                "CLAMP2_BATCH_SIZE": str(max(1, s.batch_size // max(1, s.nproc))), "M3_NUM_EPOCH": str(s.m3_epochs),
                "CLAMP2_NUM_EPOCH": str(s.clamp2_epochs), "TEXT_DROPOUT": "1" if s.text_dropout else "0"}

    @property
    def m3_weights(self) -> Path:
        return self.out / "models" / "weights_m3_small.pth"

    @property
    def clamp2_weights(self) -> Path:
        """Where train_clamp2.py writes (its best epoch by the eval loss of its own small eval split)."""
        return Path(self.s.weights) if self.s.weights else self.out / "models" / "weights_clamp2_small.pth"

    @property
    def evaluated_weights(self) -> Path:
        """The CLaMP 2 the evaluation uses: the published one, or the last epoch of the one trained here.

        train_clamp2.py keeps the epoch with the lowest eval loss on EVAL_SPLIT (1%) of the training
        pairs: 5 pairs here, too few to choose an epoch by (on the held-out pieces the last epoch beat
        that choice in every run we measured), and the held-out pieces must not choose it either.
        """
        from ..checkpoint import latest_path

        return Path(self.s.weights) if self.s.weights else Path(latest_path(self.clamp2_weights))

    @property
    def text_model(self) -> str:
        return self.s.text_model or str(self.out / "models" / "text_model")

    # ---------------------------------------------------------------------------------------------
    def run(self, only_missing: bool = True) -> int:
        if not (REPO / "code" / "train_m3.py").is_file():
            print(f"quickstart: error: the quick start runs the repository's scripts (code/, process_data/, "
                  f"semantic_search/, music_classification/), which are not in {REPO}: run code/quickstart.py "
                  "of a clone of the repository", file=sys.stderr)
            return 2
        problem = self.models_problem()
        if problem:  # before minutes of corpus work, not at the features step
            print(f"quickstart: error: {problem}", file=sys.stderr)
            return 2
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.check_settings()
        except OSError as exc:  # --out is a file, lies under a file, or cannot be written
            print(f"quickstart: error: --out {self.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        except SettingsMismatch as exc:
            print(f"quickstart: error: {exc}", file=sys.stderr)
            return 2
        steps = self.steps()
        started = time.perf_counter()
        code = code_version()  # a step's marker: a re-run says which steps another version did
        other_version = False
        for number, (name, function) in enumerate(steps, 1):
            marker = self.out / ".done" / name.replace(" ", "_")
            if only_missing and marker.exists() and name != "report":
                print(f"== {number}. {name}: done in an earlier run (delete {shlex.quote(str(marker))} to redo it)",
                      flush=True)
                other_version = other_version or _marker_code(marker) != code
                continue
            print(f"\n== {number}. {name}", flush=True)
            t0 = time.perf_counter()
            try:
                function()
            except StepFailed as error:
                print(f"quickstart: step {number} ({name}) failed: {error}", file=sys.stderr)
                return 1
            except Exception as error:  # a step's own writes (the text model's save_pretrained) on a full disk
                full = disk_full_error(error)
                if full is None and isinstance(error, PermissionError) and error.filename:
                    # A file or folder of --out made read-only (as a non-root user): a traceback at the last step.
                    print(f"quickstart: step {number} ({name}) failed: {unwritable(error.filename, error)}; fix its "
                          "permissions and run the same command again: finished steps are kept", file=sys.stderr)
                    return 1
                if full is None:
                    raise
                print(f"quickstart: step {number} ({name}) failed: {full.strerror} in {self.out}; free space and run "
                      "the same command again: finished steps are kept", file=sys.stderr)
                return 1
            self.timings[name] = round(time.perf_counter() - t0, 1)
            print(f"-- {name}: {self.timings[name]:.0f} s", flush=True)
            self.save_metrics()  # the step times so far survive a later failure
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(code + "\n", encoding="ascii")
        if other_version:
            print(f"note: steps done in an earlier run were done by another version of this package: their numbers "
                  f"may differ from a fresh run's; delete {shlex.quote(str(self.out / '.done'))} to redo them all",
                  file=sys.stderr, flush=True)
        total = time.perf_counter() - started
        self.print_summary(total)
        return 0

    def models_problem(self) -> Optional[str]:
        """With ``--weights`` (published models, no training): why they cannot be loaded, or None."""
        if not self.s.weights:
            return None
        from ..checkpoint import HUB_REPO
        from ..hub import PUBLISHED_CLAMP2_WEIGHTS, download_command
        from ..text_model import TextModelUnavailable, load_tokenizer

        if not Path(self.s.weights).is_file():
            return (f"--weights {self.s.weights}: no such file; it takes the published CLaMP 2 weights file: "
                    f"`{download_command(HUB_REPO, PUBLISHED_CLAMP2_WEIGHTS)} --local-dir .`, then "
                    f"--weights {PUBLISHED_CLAMP2_WEIGHTS}")
        try:
            load_tokenizer(self.text_model)
        except TextModelUnavailable as exc:
            return str(exc)
        return None

    def steps(self) -> List[tuple[str, Callable[[], None]]]:
        steps: List[tuple[str, Callable[[], None]]] = [
            ("corpus", self.step_corpus), ("convert", self.step_convert), ("pairs", self.step_pairs)]
        if not self.s.weights:
            steps += [("text model", self.step_text_model), ("M3", self.step_m3), ("CLaMP 2", self.step_clamp2)]
        return steps + [("features", self.step_features), ("evaluate", self.step_evaluate), ("report", self.step_report)]

    def check_settings(self) -> None:
        path = self.out / "settings.json"
        current = asdict(self.s)
        if path.exists():
            previous = json.loads(path.read_text())
            if previous != current:
                # The union: a CLaMP 3 run's folder differs from CLaMP 2 settings only in its own keys.
                if set(previous) != set(current):  # Clamp3Settings has keys of its own
                    other = "CLaMP 3" if set(previous) > set(current) else "CLaMP 2"
                    raise SettingsMismatch(f"{self.out} holds a {other} run; use another --out or delete it")
                changed = ", ".join(k for k in {**previous, **current} if previous.get(k) != current.get(k))
                raise SettingsMismatch(f"{self.out} holds a run with other settings ({changed}); "
                                       f"use another --out or delete it")
        else:
            path.write_text(json.dumps(current, indent=1))

    # 1 -------------------------------------------------------------------------------------------
    def step_corpus(self) -> None:
        from .demo_corpus import COLLECTIONS, build_demo_corpus

        pieces = build_demo_corpus(self.data, self.s.per_collection, seed=self.s.seed, progress=self.progress)
        by_split = {split: sum(p.split == split for p in pieces) for split in ("train", "test")}
        print(f"{len(pieces)} pieces from {len(COLLECTIONS)} collections "
              f"({', '.join(c.label for c in COLLECTIONS)}): {by_split['train']} train, {by_split['test']} held out")

    # 2 -------------------------------------------------------------------------------------------
    def step_convert(self) -> None:
        d = self.data
        ok = (0, 1)  # a file a converter rejects is listed and left out; the rest goes on
        run_script("process_data/batch_xml2abc.py", [d / "xml", d / "abc_standard"], ok=ok)
        run_script("process_data/batch_interleaved_abc.py", [d / "abc_standard", d / "abc"], ok=ok)
        run_script("process_data/batch_midi2mtf.py", [d / "midi", d / "mtf", *self.mtf_mode], ok=ok)

    mtf_mode: List[str] = []  # batch_midi2mtf.py's mode: M3-compatible for CLaMP 2

    # 3 -------------------------------------------------------------------------------------------
    def step_pairs(self) -> None:
        """Each piece's metadata with the paths of its ABC and MTF → one JSONL per split."""
        from ..files import atomic_write_text

        d = self.data
        for split in ("train", "test"):
            for meta in sorted((d / "metadata" / split).glob("*.json")):
                record = json.loads(meta.read_text(encoding="utf-8"))
                record["filepaths"] = [f"{kind}/{split}/{meta.stem}.{kind}" for kind in ("abc", "mtf")
                                       if (d / kind / split / f"{meta.stem}.{kind}").exists()]
                if not record["filepaths"]:
                    continue
                atomic_write_text(d / "summaries" / split / meta.name, json.dumps(record, indent=4, ensure_ascii=False))
                if split == "test":  # the held-out queries: English and the other language
                    atomic_write_text(d / "queries_en" / f"{meta.stem}.txt", record["summary_en"])
                    atomic_write_text(d / "queries_nen" / f"{meta.stem}.txt", record["summary_nen"]["summary"])
            run_script("process_data/merge_jsonl.py", [d / "summaries" / split, d / f"{split}.jsonl",
                                                       "--data_root", d], ok=(0, 1))

    # 4 -------------------------------------------------------------------------------------------
    def step_text_model(self) -> None:
        from ..text_model import build_small_text_model

        texts = []
        for line in (self.data / "train.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts += [record["summary_en"], record["summary_nen"]["summary"]]
            texts += [str(v) for k, v in record.items() if k not in ("summary_en", "summary_nen", "filepaths")]
        heads = max(1, self.s.text_hidden // 64)
        build_small_text_model(self.text_model, texts, hidden_size=self.s.text_hidden, num_layers=self.s.layers,
                               num_heads=heads, max_positions=130, max_words=4000, seed=self.s.seed)
        print(f"text encoder: XLM-R architecture, hidden {self.s.text_hidden}, {plural(self.s.layers, 'layer')}, "
              f"vocabulary from {len(texts)} training texts -> {self.text_model}")

    # 5 -------------------------------------------------------------------------------------------
    def step_m3(self) -> None:
        d = self.data
        run_script("code/train_m3.py", ["--train_folders", d / "abc" / "train", d / "mtf" / "train",
                                        "--weights", self.m3_weights, "--learning_rate", str(self.s.m3_learning_rate),
                                        *self.no_progress()], env=self.model_env())

    # 6 -------------------------------------------------------------------------------------------
    def step_clamp2(self) -> None:
        run_distributed("code/train_clamp2.py", [
            "--train_jsonl", self.data / "train.jsonl", "--text_model", self.text_model,
            "--m3_weights", self.m3_weights, "--weights", self.clamp2_weights,
            "--learning_rate", str(self.s.clamp2_learning_rate),
            *self.no_progress()], self.s.nproc, self.model_env())

    def no_progress(self) -> List[str]:
        return [] if self.progress else ["--no_progress"]

    # 7 -------------------------------------------------------------------------------------------
    def extract(self, source: Path, target: Path, normalize: bool = True) -> None:
        args = [source, target, "--weights", self.evaluated_weights, "--text_model", self.text_model]
        run_script("code/extract_clamp2.py", args + (["--normalize"] if normalize else []) + self.no_progress(),
                   env={} if self.s.weights else self.model_env())

    def step_features(self) -> None:
        d, f = self.data, self.features
        self.extract(d / "queries_en", f / "text_en")
        self.extract(d / "queries_nen", f / "text_nen")
        for split in ("train", "test"):
            self.extract(d / "abc" / split, f / f"abc_{split}")
            self.extract(d / "mtf" / split, f / f"mtf_{split}")
            self.extract(d / "abc" / split, f / f"abc_{split}_positions", normalize=False)

    # 8 -------------------------------------------------------------------------------------------
    def step_evaluate(self) -> None:
        f = self.features
        n_test = len(list((f / "abc_test").glob("*.npy")))
        self.evaluate_retrieval([("text→music (ABC)", "text_en", "abc_test"),
                                 ("text→music (MTF)", "text_en", "mtf_test"),
                                 ("other-language text→music (ABC)", "text_nen", "abc_test"),
                                 ("ABC→MTF (same piece)", "abc_test", "mtf_test")])
        self.metrics["held_out_pieces"] = n_test
        self.metrics["chance_mrr"] = round(chance_mrr(n_test), 4)
        self.zero_shot()
        self.probe()
        self.fmd()
        self.save_metrics()

    def evaluate_retrieval(self, tasks: List[Tuple[str, str, str]]) -> None:
        """semantic_search_metrics.py per (name, query folder, reference folder) of the features.

        Each task's chance is that of its own candidates: a piece that failed to convert or render is
        missing from one folder only, so the folders' counts can differ.
        """
        f = self.features
        retrieval, chances = {}, {}
        for name, query, reference in tasks:
            print(f"-- {name}: python semantic_search/semantic_search_metrics.py "
                  f"{shlex.quote(str(f / query))} {shlex.quote(str(f / reference))}")
            printed = run_script("semantic_search/semantic_search_metrics.py", [f / query, f / reference],
                                 capture=True, ok=(0, 1))
            retrieval[name] = metric_lines(printed)
            chances[name] = round(chance_mrr(len(list((f / reference).glob("*.npy")))), 4)
        self.metrics["retrieval"] = retrieval
        self.metrics["chance_mrr_by_task"] = chances

    def task_chance(self, name: str) -> float:
        """The chance MRR of one retrieval task (runs before ``chance_mrr_by_task`` have only ``chance_mrr``)."""
        return self.metrics.get("chance_mrr_by_task", {}).get(name, self.metrics.get("chance_mrr"))

    def zero_shot(self) -> None:
        self.run_zero_shot(self.data / "abc" / "test", [], env={} if self.s.weights else self.model_env())

    def run_zero_shot(self, folder: Path, model_args: List[str], env: Dict[str, str]) -> None:
        """semantic_search/zero_shot.py on ``folder`` with the collections' prompts → metrics["zero_shot"]."""
        from .demo_corpus import PROMPTS

        labels = self.out / "zero_shot_labels.txt"
        labels.write_text("".join(f"{label} = {prompt}\n" for label, prompt in PROMPTS.items()), encoding="utf-8")
        printed = run_script("semantic_search/zero_shot.py", [
            folder, *model_args, "--labels_file", labels, "--output", self.out / "zero_shot.json",
            "--confusion_png", self.out / "zero_shot_confusion.png", "--weights", self.evaluated_weights,
            "--text_model", self.text_model, "--cache", self.out / "cache", *self.no_progress()],
            env=env, capture=True, ok=(0, 1))
        match = re.search(r"accuracy ([0-9.]+), macro-F1 ([0-9.]+)", printed)
        predictions = json.loads((self.out / "zero_shot.json").read_text())
        counts: Dict[str, int] = {}
        for name in predictions:
            label = Path(name).name.split("_", 1)[0]
            counts[label] = counts.get(label, 0) + 1
        self.metrics["zero_shot"] = {"accuracy": float(match.group(1)) if match else None,
                                     "macro_f1": float(match.group(2)) if match else None,
                                     "majority_class": round(max(counts.values()) / max(1, len(predictions)), 4),
                                     "prompts": PROMPTS}

    def probe(self) -> None:
        self.run_probe("abc_train_positions", "abc_test_positions", "probe.pth", [])

    def run_probe(self, train: str, test: str, weights_name: str, probe_args: List[str]) -> None:
        """music_classification/train_cls.py on two feature folders → metrics["probe"] (eval accuracy, macro-F1)."""
        f = self.features
        report = self.out / "probe"
        run_script("music_classification/train_cls.py", [
            *probe_args, "--train_folders", f / train, "--eval_folders", f / test,
            "--weights", self.out / "models" / weights_name, "--report_dir", report, "--batch_size", "16",
            "--epochs", self.s.probe_epochs, "--learning_rate", "1e-3", "--patience", "30", *self.no_progress()],
            ok=(0, 1))
        result = json.loads((report / "metrics.json").read_text())
        self.metrics["probe"] = {"accuracy": result["eval"]["accuracy"], "macro_f1": result["eval"]["macro_f1"],
                                 "best_epoch": result["best_epoch"], "train_files": result["files"]["train"],
                                 "eval_files": result["files"]["eval"], "majority_class": self.majority_share(test)}

    def majority_share(self, folder: str) -> float:
        labels = [p.name.split("_", 1)[0] for p in (self.features / folder).glob("*.npy")]
        return round(max(labels.count(label) for label in set(labels)) / len(labels), 4) if labels else 0.0

    def group_by_collection(self, kind: str, name: str) -> Path:
        """``features/<name>/<split>/<collection>/`` holding hard links to the ``<kind>_<split>`` features,
        so that a per-collection tool reads one folder per collection (no copies)."""
        groups = self.features / name
        for split in ("train", "test"):
            for npy in sorted((self.features / f"{kind}_{split}").glob("*.npy")):
                target = groups / split / npy.name.split("_", 1)[0] / npy.name
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.link(npy, target)
        return groups

    def collection_table(self, kind: str, name: str, min_pieces: int,
                         measure: Callable[[Path, Path], float]) -> Dict[str, Dict[str, Optional[float]]]:
        """``table[held-out collection][training collection] = measure(held_out_folder, training_folder)``
        over the ``<kind>`` features; None where either side has fewer than ``min_pieces`` of them."""
        from .demo_corpus import COLLECTIONS

        groups = self.group_by_collection(kind, name)
        labels = [c.label for c in COLLECTIONS]
        table: Dict[str, Dict[str, Optional[float]]] = {}
        for test in labels:
            table[test] = {}
            for train in labels:
                held_out, training = groups / "test" / test, groups / "train" / train
                if any(len(list(side.glob("*.npy"))) < min_pieces for side in (held_out, training)):
                    table[test][train] = None
                else:
                    table[test][train] = measure(held_out, training)
        return table

    def fmd(self) -> None:
        """FMD between each collection's held-out music and each collection's training music (ABC)."""
        def fmd_of(held_out: Path, training: Path) -> float:
            printed = run_script("semantic_search/clamp2_fmd.py", [training, held_out], capture=True, ok=(0, 1))
            match = re.search(r":\s*(-?[0-9.]+(?:e[-+]?\d+)?)\s*$", printed.strip())
            return float(match.group(1)) if match else float("nan")

        # a covariance needs two pieces or more on each side
        self.metrics["fmd_test_vs_train"] = self.collection_table("abc", "by_collection", 2, fmd_of)

    def save_metrics(self) -> None:
        from ..files import atomic_write_text

        atomic_write_text(self.out / "metrics.json", json.dumps(
            {"settings": asdict(self.s), "results": self.metrics, "step_seconds": self.timings}, indent=1,
            ensure_ascii=False))

    # 9 -------------------------------------------------------------------------------------------
    def step_report(self) -> None:
        from .report import write_report

        self.save_metrics()
        write_report(self)

    def print_summary(self, seconds: float) -> None:
        r = self.metrics.get("retrieval", {})
        for name in ("text→music (ABC)", "ABC→MTF (same piece)"):
            if name in r:
                print(mrr_summary_line(name, r[name], self.task_chance(name)))
        z = self.metrics.get("zero_shot", {})
        if z.get("accuracy") is not None:
            print(f"zero-shot accuracy {z['accuracy']:.2f} (majority class {z['majority_class']:.2f})")
        p = self.metrics.get("probe", {})
        if "accuracy" in p:
            print(f"linear probe accuracy {p['accuracy']:.2f}, macro-F1 {p.get('macro_f1', float('nan')):.2f}")
        print(f"quickstart: done in {seconds / 60:.1f} min; report {self.out / 'report.md'}")


# -- the CLaMP 3 mode ------------------------------------------------------------------------------
# The same corpus, converters, pairs, text model and M3 as above; then each piece's MIDI rendered to
# audio, MERT features of it, CLaMP 3's two stages from that M3, and the held-out evaluation with
# CLaMP 3's tools. Sizes and epochs: the README's --clamp3 section says how they were chosen.

@dataclass
class Clamp3Settings(Settings):
    # One measured run of these defaults (held-out MRR, step times): README, --clamp3 section.
    symbolic_epochs: int = 20
    audio_epochs: int = 15
    audio_seconds: float = 30.0  # each piece's first seconds are rendered (a MERT row is 5 s)
    mert_hidden: int = 128  # the small random MERT's feature width (= CLaMP 3's AUDIO_HIDDEN_SIZE)
    mert_layers: int = 2
    mert_conv_dim: int = 32
    audio_layers: int = 2
    clamp3_learning_rate: float = 5e-4
    # The audio stage keeps the text encoder the symbolic stage trained (FREEZE_TEXT), so audio is
    # mapped into the space the scores are already in: ABC→audio works through it.
    freeze_text_audio: bool = True
    mert: Optional[str] = None  # a published MERT folder (or cached hub id) instead of the random one

    @classmethod
    def tiny(cls) -> "Clamp3Settings":
        settings = super().tiny()
        settings.symbolic_epochs, settings.audio_epochs, settings.audio_seconds = 8, 8, 10.0
        settings.mert_hidden, settings.mert_layers, settings.mert_conv_dim = 64, 1, 16
        settings.audio_layers, settings.probe_epochs = 1, 40
        return settings


def clamp3_record(record: dict) -> dict:
    """A CLaMP 2 pair (``summary_en``, ``summary_nen``) as CLaMP 3 reads it (``analysis``, ``translations``)."""
    other = record["summary_nen"]
    fields = {k: v for k, v in record.items() if k not in ("summary_en", "summary_nen", "filepaths")}
    return {**fields, "analysis": record["summary_en"],
            "translations": {"language": other["language"], other["language"]: other["summary"]},
            "filepaths": record["filepaths"]}


def _render_one(job) -> Optional[str]:
    from .audio_render import render_midi

    midi, wav, seconds, program = job
    try:
        render_midi(midi, wav, sample_rate=24000, seconds=seconds, program=program, channels=1)
    except Exception as exc:  # noqa: BLE001 - one piece that cannot be rendered is reported, the rest go on
        return f"{Path(midi).name}: {exc}"
    return None


class Quickstart3(Quickstart):
    """``code/quickstart.py --clamp3``: the corpus heard as audio → a small CLaMP 3 in two stages → evaluation."""

    mtf_mode = ["--clamp3"]  # CLaMP 3 reads MTF in its own mode (SPEC_CLAMP3 §18)

    def steps(self) -> List[tuple[str, Callable[[], None]]]:
        return [("corpus", self.step_corpus), ("convert", self.step_convert), ("pairs", self.step_pairs),
                ("text model", self.step_text_model), ("M3", self.step_m3), ("audio", self.step_audio),
                ("MERT", self.step_mert), ("CLaMP 3 symbolic", self.step_symbolic), ("CLaMP 3 audio", self.step_audio_stage),
                ("features", self.step_features), ("evaluate", self.step_evaluate), ("report", self.step_report)]

    @property
    def mert_model(self) -> str:
        return self.s.mert or str(self.out / "models" / "mert_small")

    @property
    def audio_width(self) -> int:
        if not self.s.mert:
            return self.s.mert_hidden
        from ..models.mert import resolve_mert_folder

        return int(json.loads((resolve_mert_folder(self.s.mert) / "config.json").read_text())["hidden_size"])

    def model_env(self) -> Dict[str, str]:
        env = super().model_env()
        env.update({"CLAMP3_HIDDEN_SIZE": str(self.s.clamp2_hidden), "AUDIO_HIDDEN_SIZE": str(self.audio_width),
                    "AUDIO_NUM_LAYERS": str(self.s.audio_layers), "MAX_AUDIO_LENGTH": "128",
                    "CLAMP3_BATCH_SIZE": env["CLAMP2_BATCH_SIZE"]})
        return env

    @property
    def symbolic_weights(self) -> Path:
        return self.out / "models" / "weights_clamp3_symbolic.pth"

    @property
    def clamp3_weights(self) -> Path:
        return self.out / "models" / "weights_clamp3_small.pth"

    @property
    def evaluated_weights(self) -> Path:
        """The last epoch of the audio stage (as CLaMP 2's: the 1% eval split is too small to pick an epoch)."""
        from ..checkpoint import latest_path

        return Path(latest_path(self.clamp3_weights))

    # 3: CLaMP 2's pairs, then the same pairs in CLaMP 3's form --------------------------------------
    def step_pairs(self) -> None:
        from ..files import atomic_write_text

        super().step_pairs()
        for split in ("train", "test"):
            records = [clamp3_record(json.loads(line)) for line in
                       (self.data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
            atomic_write_text(self.data / f"clamp3_symbolic_{split}.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    # 6 -------------------------------------------------------------------------------------------
    def step_audio(self) -> None:
        """Each piece's MIDI → mono 24 kHz WAV of its first ``audio_seconds``, on its collection's instrument."""
        from concurrent.futures import ProcessPoolExecutor

        from ..workers import exit_with_parent
        from ..files import finished_output, remove_partial_files_of
        from ..progress import progress_bar
        from .demo_corpus import INSTRUMENTS

        pairs = [(midi, self.data / "audio" / split / f"{midi.stem}.wav")
                 for split in ("train", "test") for midi in sorted((self.data / "midi" / split).glob("*.mid"))]
        remove_partial_files_of([wav for _, wav in pairs])  # renders killed mid-write (the run killed) left these
        jobs = [(str(midi), str(wav), self.s.audio_seconds, INSTRUMENTS[midi.stem.split("_", 1)[0]][0])
                for midi, wav in pairs if not finished_output(wav)]
        workers = min(len(jobs), os.cpu_count() or 1)
        failures = []
        bar = progress_bar(total=len(jobs), desc="audio", unit="piece", enabled=self.progress)
        with ProcessPoolExecutor(max(1, workers), initializer=exit_with_parent) as pool:  # none left if killed
            for problem in pool.map(_render_one, jobs, chunksize=8):
                bar.update(1)
                if problem:
                    failures.append(problem)
        bar.close()
        for problem in failures:
            print(f"not rendered: {problem}", file=sys.stderr)
        rendered = sum(1 for _ in (self.data / "audio").rglob("*.wav"))
        if failures and not rendered:  # e.g. --audio_seconds that is no number: the MERT step would fail next
            raise StepFailed("no piece could be rendered to audio (see the lines above)")
        print(f"{rendered} pieces rendered (first {self.s.audio_seconds:g} s, mono 24 kHz, TinySoundFont with "
              f"pretty_midi's General MIDI SoundFont) -> {self.data / 'audio'}")

    # 7 -------------------------------------------------------------------------------------------
    def step_mert(self) -> None:
        from ..files import atomic_write_text

        if not self.s.mert:
            from ..models.mert import build_small_mert

            build_small_mert(self.mert_model, hidden_size=self.s.mert_hidden, num_layers=self.s.mert_layers,
                             conv_dim=self.s.mert_conv_dim, seed=self.s.seed)
            print(f"MERT architecture with RANDOM weights (hidden {self.s.mert_hidden}, "
                  f"{plural(self.s.mert_layers, 'layer')}, "
                  f"conv width {self.s.mert_conv_dim}) -> {self.mert_model}")
        run_script("process_data/extract_mert.py", [self.data / "audio", self.data / "mert", "--model", self.mert_model,
                                                    *self.no_progress()], ok=(0, 1))
        for split in ("train", "test"):
            lines = []
            for line in (self.data / f"clamp3_symbolic_{split}.jsonl").read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                stem = Path(record["filepaths"][0]).stem
                if (self.data / "mert" / split / f"{stem}.npy").exists():
                    record["filepaths"] = [f"mert/{split}/{stem}.npy"]
                    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            atomic_write_text(self.data / f"clamp3_audio_{split}.jsonl", "".join(lines))

    # 8, 9 ----------------------------------------------------------------------------------------
    def train_clamp3(self, stage: str, weights: Path, epochs: int, extra: List[str]) -> None:
        run_distributed(f"code/train_clamp3_{stage}.py", [
            "--train_jsonl", self.data / f"clamp3_{stage}_train.jsonl", "--text_model", self.text_model,
            "--m3_weights", self.m3_weights, "--weights", weights, "--epochs", epochs,
            "--learning_rate", str(self.s.clamp3_learning_rate), "--save_every", "0", *extra, *self.no_progress()],
            self.s.nproc, self.model_env())

    def step_symbolic(self) -> None:
        self.train_clamp3("symbolic", self.symbolic_weights, self.s.symbolic_epochs, [])

    def step_audio_stage(self) -> None:
        """The audio stage starts from the symbolic stage's last epoch (a stage switch: new optimizer, epoch 1)."""
        import shutil

        from ..checkpoint import latest_path

        if not self.clamp3_weights.exists():
            shutil.copyfile(latest_path(self.symbolic_weights), self.clamp3_weights)
        self.train_clamp3("audio", self.clamp3_weights, self.s.audio_epochs,
                          ["--freeze_text"] if self.s.freeze_text_audio else [])

    # 10 ------------------------------------------------------------------------------------------
    def extract(self, source: Path, target: Path, normalize: bool = True) -> None:
        run_script("code/extract_clamp3.py", [source, target, "--weights", self.evaluated_weights,
                                              "--text_model", self.text_model, "--get_global", *self.no_progress()],
                   env=self.model_env())

    def step_features(self) -> None:
        d, f = self.data, self.features
        self.extract(d / "queries_en", f / "text_en")
        for split in ("train", "test"):
            self.extract(d / "mert" / split, f / f"audio_{split}")
        self.extract(d / "abc" / "test", f / "abc_test")
        self.extract(d / "mtf" / "test", f / "mtf_test")

    # 11 ------------------------------------------------------------------------------------------
    def step_evaluate(self) -> None:
        f = self.features
        n_test = len(list((f / "audio_test").glob("*.npy")))
        self.evaluate_retrieval([("text→ABC", "text_en", "abc_test"), ("text→audio", "text_en", "audio_test"),
                                 ("ABC→audio (same piece)", "abc_test", "audio_test"),
                                 ("MTF→audio (same piece)", "mtf_test", "audio_test")])
        self.metrics["held_out_pieces"] = n_test
        self.metrics["chance_mrr"] = round(chance_mrr(n_test), 4)
        self.metrics["audio_front_end"] = ("published MERT " + self.s.mert) if self.s.mert else "random"
        self.zero_shot()
        self.probe()
        self.score_table()
        self.save_metrics()

    def zero_shot(self) -> None:
        """Zero-shot collection of the held-out audio (raw WAV through MERT and CLaMP 3, as a user runs it)."""
        self.run_zero_shot(self.data / "audio" / "test", ["--model", "clamp3", "--mert", self.mert_model],
                           env=self.model_env())

    def probe(self) -> None:
        """CLaMP 3's probe (one linear layer, SPEC_CLAMP3 §20) on the global CLaMP 3 audio features."""
        self.run_probe("audio_train", "audio_test", "probe_audio.pth", ["--probe", "clamp3"])

    def score_table(self) -> None:
        """clamp3_score --group: each collection's held-out audio against each collection's training audio."""
        def group_score(held_out: Path, training: Path) -> float:
            printed = run_script("semantic_search/clamp3_score.py", [held_out, training, "--group", "--no_progress"],
                                 capture=True, ok=(0, 1))
            match = re.search(r"^Group similarity: (-?[0-9.]+)", printed, flags=re.M)
            return float(match.group(1)) if match else float("nan")

        self.metrics["clamp3_score_test_vs_train"] = self.collection_table("audio", "audio_by_collection", 1,
                                                                           group_score)

    # 12 ------------------------------------------------------------------------------------------
    def step_report(self) -> None:
        from .report import write_report_clamp3

        self.save_metrics()
        write_report_clamp3(self)

    def print_summary(self, seconds: float) -> None:
        r = self.metrics.get("retrieval", {})
        front = self.metrics.get("audio_front_end", "random")
        for name in ("text→ABC", "text→audio", "ABC→audio (same piece)", "MTF→audio (same piece)"):
            if name in r:
                print(mrr_summary_line(name, r[name], self.task_chance(name)))
        z = self.metrics.get("zero_shot", {})
        if z.get("accuracy") is not None:
            print(f"zero-shot accuracy on audio {z['accuracy']:.2f} (majority class {z['majority_class']:.2f})")
        p = self.metrics.get("probe", {})
        if "accuracy" in p:
            print(f"linear probe on audio features accuracy {p['accuracy']:.2f}, macro-F1 {p.get('macro_f1', float('nan')):.2f}")
        print(f"audio front end: {'a MERT with RANDOM weights (no download)' if front == 'random' else front}")
        print(f"quickstart --clamp3: done in {seconds / 60:.1f} min; report {self.out / 'report.md'}")
