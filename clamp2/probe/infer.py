"""A trained probe: loading it (ours or the reference's checkpoints) and predicting feature files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import numpy as np
import torch

from ..checkpoint import PROBE, checkpoint_family, family_mismatch, load_state, read_checkpoint, state_dict_of
from ..distributed import DistInfo
from .data import FeatureSet, ProbeDataset, ProbeUsageError
from torch import nn

from .model import probe_from_state
from .train import predict


@dataclass
class TrainedProbe:
    model: nn.Module  # LinearProbe (CLaMP 2) or LinearClassifier (CLaMP 3)
    class_names: List[str]  # index → label
    epoch: int
    max_eval_acc: float

    @property
    def input_size(self) -> int:
        return self.model.input_size


def load_probe(path: str | os.PathLike, device: torch.device = torch.device("cpu")) -> TrainedProbe:
    """The probe and label map of a checkpoint written by ``train_cls.py`` (this one's or the reference's)."""
    try:
        checkpoint = read_checkpoint(path)
    except FileNotFoundError:
        raise ProbeUsageError(f"probe weights not found: {path} (train one with music_classification/train_cls.py "
                              "and pass its file with --weights)") from None
    except RuntimeError as exc:
        raise ProbeUsageError(" ".join(str(exc).split())) from None
    found = checkpoint_family(checkpoint)
    if found not in (None, PROBE):
        raise ProbeUsageError(family_mismatch(checkpoint, PROBE, str(path)))
    labels = checkpoint.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ProbeUsageError(f"{path} has no label map ('labels'): not a checkpoint of music_classification/"
                              "train_cls.py")
    state = state_dict_of(checkpoint)
    try:
        model = probe_from_state(state)
        load_state(model, state, source=f"checkpoint {path}")
    except (KeyError, RuntimeError) as exc:
        raise ProbeUsageError(f"{path}: {' '.join(str(exc).split())}") from None
    names = [label for label, _ in sorted(labels.items(), key=lambda item: item[1])]
    classes = (model.fc if hasattr(model, "fc") else model.fc2).out_features
    if sorted(labels.values()) != list(range(len(names))) or len(names) != classes:
        raise ProbeUsageError(f"{path}: its label map does not match its {classes} classes")
    return TrainedProbe(model.to(device).eval(), names, int(checkpoint.get("epoch", 0)),
                        float(checkpoint.get("max_eval_acc", float("nan"))))


def predict_features(probe: TrainedProbe, features: FeatureSet, batch_size: int,
                     device: torch.device) -> np.ndarray:
    """Probabilities ``[files, classes]``; the same for every batch size (padding is masked)."""
    dataset = ProbeDataset(features, range(len(features)), [0] * len(features))
    return predict(probe.model, dataset, batch_size, DistInfo(device=device), len(probe.class_names))
