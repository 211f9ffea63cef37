"""Training of M3 and CLaMP 2: data (``data``), M3 corruption (``corruption``), the shared loop
(``loop``) and the two tasks (``tasks``). The scripts ``code/train_m3.py`` and
``code/train_clamp2.py`` only parse flags and call these."""
