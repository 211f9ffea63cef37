"""Training of M3, CLaMP 2 and CLaMP 3: data (``data``), M3 corruption (``corruption``), the shared
loop (``loop``), the tasks (``tasks``) and CLaMP 3's command line shared by its two stages
(``clamp3``). The scripts ``code/train_*.py`` only parse flags and call these."""
