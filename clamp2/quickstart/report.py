"""The quick start's report: ``report.md`` and the PNG plots a researcher looks at first.

Plots: training curves of M3 and CLaMP 2 (from their per-epoch logs), the held-out text × music
similarity matrix, a 2-D PCA map of the music features coloured by collection, and the linear
probe's confusion matrix (drawn by the probe itself).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..files import atomic_path, atomic_write_text
from ..progress import plural


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _pyplot().close(fig)


def read_log(path: Path) -> Dict[str, List[float]]:
    """Per-epoch ``train_loss`` / ``eval_loss`` of a training log (the reference's format)."""
    losses: Dict[str, List[float]] = {"train_loss": [], "eval_loss": []}
    if path.exists():
        for name, value in re.findall(r"^(train_loss|eval_loss): (\S+)$", path.read_text(), flags=re.M):
            losses[name].append(float(value))
    return losses


def plot_training(curves: Dict[str, Dict[str, List[float]]], chance: Dict[str, float], path: Path) -> bool:
    shown = {name: c for name, c in curves.items() if c["train_loss"]}
    if not shown:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.6))
    for ax, (name, c) in zip(np.atleast_1d(axes), shown.items()):
        epochs = range(1, len(c["train_loss"]) + 1)
        ax.plot(epochs, c["train_loss"], marker="o", label="train")
        if c["eval_loss"]:
            ax.plot(range(1, len(c["eval_loss"]) + 1), c["eval_loss"], marker="o", label="eval")
        if name in chance:
            ax.axhline(chance[name], color="gray", linestyle="--", label="chance")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    _save(fig, path)
    return True


def load_folder(folder: Path) -> Tuple[List[str], np.ndarray]:
    """Global features ``[1, D]`` one row per file (a ``[1, n, D]`` file, e.g. MERT's, gives its mean row)."""
    files = sorted(folder.glob("*.npy"))
    rows = [np.load(f)[0] for f in files]
    return [f.stem for f in files], np.stack([r.mean(axis=0) if r.ndim > 1 else r for r in rows]) if files else np.zeros((0, 0))


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1; an all-zero row stays zero (similarity 0) instead of becoming NaN."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return unit_rows(a) @ unit_rows(b).T


def plot_similarity(text_dir: Path, music_dir: Path, path: Path, music_name: str = "held-out music (ABC)") -> bool:
    text_keys, text = load_folder(text_dir)
    music_keys, music = load_folder(music_dir)
    common = sorted(set(text_keys) & set(music_keys))
    if not common:
        return False
    t = text[[text_keys.index(k) for k in common]]
    m = music[[music_keys.index(k) for k in common]]
    scores = cosine_matrix(t, m)
    labels = [k.split("_", 1)[0] for k in common]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(scores, cmap="viridis")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    bounds = [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]]
    for b in bounds:
        ax.axhline(b - 0.5, color="white", linewidth=0.6)
        ax.axvline(b - 0.5, color="white", linewidth=0.6)
    starts = [0] + bounds
    ends = bounds + [len(labels)]
    ax.set_xticks([(s + e - 1) / 2 for s, e in zip(starts, ends)], [labels[s] for s in starts], rotation=45,
                  ha="right", fontsize=8)
    ax.set_yticks([(s + e - 1) / 2 for s, e in zip(starts, ends)], [labels[s] for s in starts], fontsize=8)
    ax.set_xlabel(music_name)
    ax.set_ylabel("held-out English descriptions")
    ax.set_title("text × music similarity (true pairs on the diagonal)")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_feature_map(folders: Dict[str, Path], path: Path, title: str = "CLaMP 2 music features (PCA), by collection") -> bool:
    """PCA of the music features of every folder, coloured by collection, marker by folder."""
    from sklearn.decomposition import PCA

    rows, labels, kinds = [], [], []
    for kind, folder in folders.items():
        keys, features = load_folder(folder)
        if not keys:
            continue
        features = unit_rows(features)
        rows.append(features)
        labels += [k.split("_", 1)[0] for k in keys]
        kinds += [kind] * len(keys)
    if not rows:
        return False
    points = PCA(n_components=2, random_state=0).fit_transform(np.concatenate(rows))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    colours = plt.get_cmap("tab10")
    markers = ["o", "^", "s", "D"]
    for ci, label in enumerate(sorted(set(labels))):
        for mi, kind in enumerate(folders):
            chosen = [i for i, (l, k) in enumerate(zip(labels, kinds)) if l == label and k == kind]
            if chosen:
                ax.scatter(points[chosen, 0], points[chosen, 1], s=14, color=colours(ci), marker=markers[mi % 4],
                           label=f"{label} ({kind})" if len(folders) > 1 else label, alpha=0.75)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    return True


SIZE_NAMES = ("PATCH_LENGTH", "PATCH_NUM_LAYERS", "TOKEN_NUM_LAYERS", "M3_HIDDEN_SIZE", "CLAMP2_HIDDEN_SIZE",
              "MAX_TEXT_LENGTH", "CLAMP3_HIDDEN_SIZE", "AUDIO_HIDDEN_SIZE", "AUDIO_NUM_LAYERS", "MAX_AUDIO_LENGTH")


def _by_hand(run, script: str, source: str, target: str, flag: str) -> List[str]:
    """How to re-run the extraction by hand: the scripts read the model's sizes from config.py, so the small
    models trained here need the quick start's overrides (without them the checkpoint does not load)."""
    import shlex

    env = {} if run.s.weights else run.model_env()
    sizes = " ".join(f"{k}={env[k]}" for k in SIZE_NAMES if k in env)
    command = " ".join(shlex.quote(str(a)) for a in ["python", script, run.data / source, run.out / "by_hand" / target,
                                                      flag, "--weights", run.evaluated_weights,
                                                      "--text_model", run.text_model])
    return ["To re-run a number by hand, run the scripts from the repository folder with the model's sizes as "
            "environment overrides (code/config.py's defaults are the published sizes), e.g.:", "", "```bash",
            (sizes + " " if sizes else "") + command, "```", ""]


def write_report(run) -> None:
    """Plots and ``report.md`` for a finished :class:`clamp2.quickstart.pipeline.Quickstart` run."""
    out = run.out
    plots = out / "plots"
    made: Dict[str, bool] = {}
    curves = {"M3 (masked-patch reconstruction)": read_log(run.m3_weights.with_name("logs_m3_small.txt")),
              "CLaMP 2 (contrastive)": read_log(run.clamp2_weights.with_name("logs_clamp2_small.txt"))}
    chance = {"M3 (masked-patch reconstruction)": float(np.log(128))}
    made["training_curves.png"] = plot_training(curves, chance, plots / "training_curves.png")
    made["similarity_matrix.png"] = plot_similarity(run.features / "text_en", run.features / "abc_test",
                                                    plots / "similarity_matrix.png")
    made["feature_map.png"] = plot_feature_map({"ABC": run.features / "abc_train", "MTF": run.features / "mtf_train"},
                                               plots / "feature_map.png")
    probe_png = out / "probe" / "confusion_matrix.png"
    atomic_write_text(out / "report.md", report_text(run, made, probe_png))


def _retrieval_table(m: dict, n: int, chance: float) -> List[str]:
    """The report's retrieval section: one row per held-out task of ``metrics["retrieval"]``."""
    lines = ["## Retrieval (held-out pieces)", "",
             "Each query must find its own piece among all held-out pieces; chance is the MRR of a random "
             f"ranking of {n} candidates.", "",
             "| task | MRR | chance | × chance | Hit@K |", "| --- | --- | --- | --- | --- |"]
    by_task = m.get("chance_mrr_by_task", {})
    return lines + [_mrr_line(name, values, by_task.get(name, chance))
                    for name, values in m.get("retrieval", {}).items()]


def _collection_table(table: Dict[str, Dict[str, Optional[float]]], digits: int, lower_is_closer: bool) -> List[str]:
    """A held-out × training collection table; the closest cell of each row in bold, n/a where not computed."""
    labels = list(table)
    lines = ["| held out \\ train | " + " | ".join(labels) + " |", "|" + " --- |" * (len(labels) + 1)]
    for row in labels:
        values = [table[row].get(col) for col in labels]
        # A cell whose script printed no number holds NaN: shown, never bolded as the closest.
        if any(v is not None and not np.isnan(v) for v in values):
            closeness = [(-v if lower_is_closer else v) if v is not None and not np.isnan(v) else -np.inf
                         for v in values]
            best = int(np.argmax(closeness))
        else:
            best = -1
        cells = ["n/a" if v is None else f"**{v:.{digits}f}**" if i == best else f"{v:.{digits}f}"
                 for i, v in enumerate(values)]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines + [""]


def _plots_and_timings(captions: Dict[str, str], made: Dict[str, bool], timings: Dict[str, float]) -> List[str]:
    """The report's closing sections: the plots that were made, with captions, then each step's time."""
    lines = ["## Plots", ""]
    for name, caption in captions.items():
        if made.get(name):
            lines += [f"![{caption}](plots/{name})", f"*{caption}*", ""]
    lines += ["## Time", "", "| step | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()]
    return lines + ["", "All numbers are also in `metrics.json`."]


def _mrr_line(name: str, values: Dict[str, float], chance: float) -> str:
    mrr = values.get("MRR", float("nan"))
    hits = ", ".join(f"{k} {v:.2f}" for k, v in values.items() if k != "MRR")
    ratio = mrr / chance if chance else float("nan")
    return f"| {name} | {mrr:.3f} | {chance:.3f} | {ratio:.1f}× | {hits} |"


def report_text(run, made: Dict[str, bool], probe_png: Path) -> str:
    m, s = run.metrics, run.s
    chance = m.get("chance_mrr", float("nan"))
    n = m.get("held_out_pieces", 0)
    lines = ["# CLaMP 2 quick start report", ""]
    trained = "the published CLaMP 2" if s.weights else (
        f"a small M3 (hidden {s.m3_hidden}, {plural(s.layers, 'layer')}, {plural(s.m3_epochs, 'epoch')}) and a small "
        f"CLaMP 2 (text encoder hidden {s.text_hidden}, {plural(s.clamp2_epochs, 'epoch')}, "
        f"{plural(s.nproc, 'process', 'es')}{', text dropout on' if s.text_dropout else ''}) trained here, "
        f"evaluated with its last epoch's weights (`{run.evaluated_weights.relative_to(run.out).as_posix()}`: "
        "the training run's own eval split, 1% of the training pairs, is too small to choose an epoch by)")
    lines += [f"Music from music21's corpus: {s.per_collection} pieces from each of six collections, "
              f"{n} held out (never seen in training). Model: {trained}. Every number below comes from "
              "the project's own scripts, run on the held-out pieces.", ""]
    lines += _by_hand(run, "code/extract_clamp2.py", "abc/test", "abc_test", "--normalize")
    lines += _retrieval_table(m, n, chance)
    languages = ("trained on too: this run used `--text_dropout`, which draws the training text from all of them"
                 if s.text_dropout else
                 "never trained on: with text dropout off, training sees only the English descriptions, so these "
                 "match through shared names, keys and numbers; `--text_dropout` trains on them")
    lines += ["", "*text→music*: an English description written from the piece's metadata (title, collection, "
              "key, meter, voices, range) finds the piece's interleaved ABC (or MTF). *other-language*: the same "
              f"with the German, French or Spanish description ({languages}). *ABC→MTF*: a piece's ABC finds the "
              "MTF rendered from the same piece: the two formats share one embedding space.", ""]
    z = m.get("zero_shot", {})
    if z:
        lines += ["## Zero-shot classification by prompt", "",
                  f"Accuracy **{z.get('accuracy')}** (macro-F1 {z.get('macro_f1')}) over the held-out ABC, "
                  f"against {z.get('majority_class')} for always answering the largest class. Prompts:", ""]
        lines += [f"- `{label}`: \"{prompt}\"" for label, prompt in z.get("prompts", {}).items()]
        lines += ["", "![zero-shot confusion](zero_shot_confusion.png)", ""]
    p = m.get("probe", {})
    if p:
        shown = {k: v for k, v in p.items() if isinstance(v, (int, float))}
        lines += ["## Linear probe", "",
                  "The original's probe (Linear + ReLU per position, mean, Linear, softmax) trained on the "
                  "per-position CLaMP 2 features of the training pieces, evaluated on the held-out ones: "
                  + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()), ""]
        if probe_png.exists():
            lines += [f"![probe confusion matrix]({probe_png.relative_to(run.out).as_posix()})", ""]
    fmd = m.get("fmd_test_vs_train", {})
    if fmd:
        lines += ["## Fréchet Music Distance between collections", "",
                  "FMD of each collection's held-out music (rows) to each collection's training music "
                  "(columns); lower is closer, so the diagonal should be the smallest in each row. With so few "
                  "pieces per collection the covariances are rough: compare within a row.", ""]
        lines += _collection_table(fmd, digits=2, lower_is_closer=True)
        if any(v is None for row in fmd.values() for v in row.values()):
            lines += ["n/a: fewer than two pieces on one side (a covariance needs two); one piece in five is held "
                      "out, so `--per_collection 10` or more holds out two of each collection.", ""]
    captions = {"training_curves.png": "training curves (loss per epoch; M3's chance is ln 128)",
                "similarity_matrix.png": "held-out text × music cosine similarity, grouped by collection",
                "feature_map.png": "PCA map of the training music features, coloured by collection"}
    return "\n".join(lines + _plots_and_timings(captions, made, run.timings)) + "\n"


def write_report_clamp3(run) -> None:
    """Plots and ``report.md`` for a finished :class:`clamp2.quickstart.pipeline.Quickstart3` run."""
    from .demo_corpus import INSTRUMENTS

    out = run.out
    plots = out / "plots"
    made: Dict[str, bool] = {}
    curves = {"M3 (masked-patch reconstruction)": read_log(run.m3_weights.with_name("logs_m3_small.txt")),
              "CLaMP 3 symbolic stage": read_log(run.symbolic_weights.with_name("logs_clamp3_symbolic.txt")),
              "CLaMP 3 audio stage": read_log(run.clamp3_weights.with_name("logs_clamp3_small.txt"))}
    made["training_curves.png"] = plot_training(curves, {"M3 (masked-patch reconstruction)": float(np.log(128))},
                                                plots / "training_curves.png")
    made["similarity_matrix.png"] = plot_similarity(run.features / "text_en", run.features / "audio_test",
                                                    plots / "similarity_matrix.png", "held-out audio")
    made["feature_map.png"] = plot_feature_map(
        {"train": run.features / "audio_train", "held out": run.features / "audio_test"}, plots / "feature_map.png",
        "CLaMP 3 audio features (PCA), by collection")
    made["mert_map.png"] = plot_feature_map(
        {"train": run.data / "mert" / "train", "held out": run.data / "mert" / "test"}, plots / "mert_map.png",
        "MERT features, mean over 5-s rows (PCA), by collection")
    m, s = run.metrics, run.s
    chance = m.get("chance_mrr", float("nan"))
    n = m.get("held_out_pieces", 0)
    lines = ["# CLaMP 3 quick start report", ""]
    instruments = ", ".join(f"{label}: {name} (GM program {program + 1})" for label, (program, name) in INSTRUMENTS.items())
    lines += [f"Music from music21's corpus: {s.per_collection} pieces from each of six collections, {n} held out "
              "(never seen in training), each piece's MIDI rendered to audio: **the first "
              f"{s.audio_seconds:g} seconds** of each piece (mono, 24 kHz), with TinySoundFont and the General MIDI "
              f"SoundFont of pretty_midi, one instrument per collection ({instruments}).", ""]
    if s.mert:
        lines += [f"**Audio front end: the published MERT** (`{s.mert}`).", ""]
    else:
        lines += [f"**Audio front end: a MERT with random weights.** The published MERT-v1-95M cannot be downloaded "
                  "here (the quick start runs offline), so `process_data/extract_mert.py` reads a MERT-architecture "
                  f"model built locally with random, untrained weights (hidden {s.mert_hidden}, "
                  f"{plural(s.mert_layers, 'layer')}, convolution width {s.mert_conv_dim}; `models/mert_small`). "
                  "Its features still carry what random convolutions over the waveform keep (loudness, spectrum, "
                  "timbre, some pitch and rhythm), averaged over each 5-s window, but none of what MERT learned. "
                  "`--mert PATH` runs the same pipeline on the published MERT-v1-95M.", ""]
    lines += [f"Model: the small M3 (hidden {s.m3_hidden}, {plural(s.layers, 'layer')}, "
              f"{plural(s.m3_epochs, 'epoch')}) of the CLaMP 2 quick start, then a small CLaMP 3 (text encoder "
              f"hidden {s.text_hidden}, audio encoder {plural(s.audio_layers, 'layer')}, joint space "
              f"{s.clamp2_hidden}) trained in two stages under torchrun with {plural(s.nproc, 'process', 'es')}: "
              "`code/train_clamp3_symbolic.py` "
              f"({plural(s.symbolic_epochs, 'epoch')}, text ↔ ABC/MTF), then `code/train_clamp3_audio.py` "
              f"({plural(s.audio_epochs, 'epoch')}, text ↔ MERT features, starting from "
              "the symbolic stage's last epoch"
              + (", text encoder frozen so that audio joins the space the scores are in" if s.freeze_text_audio else "")
              + "). Evaluated with the audio stage's last epoch "
              f"(`{run.evaluated_weights.relative_to(run.out).as_posix()}`). Every number below comes from the "
              "project's own scripts, run on the held-out pieces.", ""]
    lines += _by_hand(run, "code/extract_clamp3.py", "mert/test", "audio_test", "--get_global")
    lines += _retrieval_table(m, n, chance)
    lines += ["", "*text→*: an English description written from the piece's metadata (title, collection, key, meter, "
              "voices, range) finds the piece's interleaved ABC, or its audio. *ABC→audio*, *MTF→audio*: a piece's "
              "score (interleaved ABC, or MTF of its MIDI in CLaMP 3's mode) finds the recording of the same piece; "
              "score and audio were never paired in training: they meet through the text space.", ""]
    z = m.get("zero_shot", {})
    if z:
        lines += ["## Zero-shot collection of the held-out audio", "",
                  f"`semantic_search/zero_shot.py --model clamp3` on the held-out WAV files: accuracy "
                  f"**{z.get('accuracy')}** (macro-F1 {z.get('macro_f1')}), against {z.get('majority_class')} for "
                  "always answering the largest class. Prompts:", ""]
        lines += [f"- `{label}`: \"{prompt}\"" for label, prompt in z.get("prompts", {}).items()]
        lines += ["", "![zero-shot confusion](zero_shot_confusion.png)", ""]
    p = m.get("probe", {})
    probe_png = out / "probe" / "confusion_matrix.png"
    if p:
        shown = {k: v for k, v in p.items() if isinstance(v, (int, float))}
        lines += ["## Linear probe on audio features", "",
                  "CLaMP 3's probe (one linear layer and softmax, `music_classification/train_cls.py --probe clamp3`) "
                  "trained on the global CLaMP 3 audio features of the training pieces, evaluated on the held-out "
                  "ones: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()),
                  ""]
        if probe_png.exists():
            lines += [f"![probe confusion matrix]({probe_png.relative_to(out).as_posix()})", ""]
    table = m.get("clamp3_score_test_vs_train", {})
    if table:
        lines += ["## CLaMP 3 score between collections (audio)", "",
                  "`semantic_search/clamp3_score.py --group`: cosine of the mean CLaMP 3 feature of each collection's "
                  "held-out audio (rows) and that of each collection's training audio (columns); higher is closer, "
                  "so the diagonal should be the largest in each row.", ""]
        lines += _collection_table(table, digits=3, lower_is_closer=False)
    captions = {"training_curves.png": "training curves (loss per epoch): M3, the symbolic and the audio stage",
                "similarity_matrix.png": "held-out text × audio cosine similarity, grouped by collection",
                "feature_map.png": "PCA map of the CLaMP 3 audio features, coloured by collection",
                "mert_map.png": "PCA map of the MERT features CLaMP 3 reads, coloured by collection"}
    atomic_write_text(out / "report.md", "\n".join(lines + _plots_and_timings(captions, made, run.timings)) + "\n")
