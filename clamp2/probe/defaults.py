"""The probe's defaults, without torch: ``music_classification/train_cls.py`` shows them in its help, so
``--help`` answers before torch loads. :mod:`clamp2.probe.model` and :mod:`clamp2.probe.train` import the ones
they use from here; import them from here too.
"""

HIDDEN_SIZE = 768  # the reference's HIDDEN_SIZE
BASE_SEED = 42
NUM_EPOCHS = 1000  # the reference's NUM_EPOCHS
LEARNING_RATE = 1e-5  # the reference's LEARNING_RATE
EVAL_SPLIT = 0.2  # the reference's EVAL_SPLIT (music_classification/config.py)
