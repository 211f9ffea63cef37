"""Package data: the 100 CLaMP 2 summary languages (``languages.txt``), read with importlib.resources."""
