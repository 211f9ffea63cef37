"""Linear-probe classification on extracted features (SPEC §10): ``music_classification/*.py``.

- ``data``: feature files, labels from file names, checks, padded batches, epoch orders;
- ``model``: the reference's probe (Linear + ReLU per position, mean, Linear, softmax);
- ``train``: one training run (hold-out) or stratified K-fold, resumable, DDP-ready;
- ``report``: metrics, ``metrics.json``, confusion-matrix and learning-curve PNGs;
- ``infer``: predictions ``{feature_path: label}`` from a trained probe.
"""
