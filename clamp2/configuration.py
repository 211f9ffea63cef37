"""Environment overrides for ``code/config.py`` and loading of that file.

``code/config.py`` keeps the reference's constant names and defaults; this module lets every
constant be overridden by an environment variable of the same name without editing the file, so
one launch line configures every rank of a ``torchrun`` job::

    PATCH_NUM_LAYERS=2 M3_HIDDEN_SIZE=128 torchrun --nproc_per_node=2 code/train_m3.py

Values are parsed by the type of the default (bool, int, float, str, list) and type-checked.
An environment variable that starts with one of the config's own prefixes (``M3_``, ``CLAMP2_``, ``CLAMP3_``)
and is a near-miss of a constant is an error, so a typo never silently trains the wrong model;
other unknown names with those prefixes (other tools' settings) are only warned about.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, MutableMapping

# Prefixes reserved for config names: an unknown variable with one of them is a typo.
RESERVED_PREFIXES = ("M3_", "CLAMP2_", "CLAMP3_")

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


class ConfigError(ValueError):
    """An environment override that cannot be applied."""


def _is_config_name(name: str) -> bool:
    return name.isupper() and not name.startswith("_")


def parse_value(name: str, raw: str, default: Any) -> Any:
    """Parse the text ``raw`` of variable ``name`` into the type of ``default``."""
    text = raw.strip()
    if isinstance(default, bool):
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{name}={raw!r}: expected a boolean (1/0, true/false, yes/no, on/off)")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a number") from None
    if isinstance(default, (list, tuple)):
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                try:
                    items = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    raise ConfigError(f"{name}={raw!r}: expected a JSON list or comma-separated values") from None
            if not isinstance(items, list):
                raise ConfigError(f"{name}={raw!r}: expected a list")
        else:
            items = [part.strip() for part in text.split(",") if part.strip()]
        if default:
            element_default = default[0]
            items = [parse_value(name, str(item), element_default) if isinstance(item, str) else item for item in items]
        return type(default)(items)
    if default is None:
        if text.lower() in {"none", "null", ""}:
            return None
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return raw
    return raw


def apply_env_overrides(namespace: MutableMapping[str, Any], names=None,
                        environ: Mapping[str, str] | None = None) -> dict[str, tuple[Any, Any]]:
    """Replace the constants of ``namespace`` found in ``environ``; return ``{name: (default, value)}``.

    ``names`` restricts the pass to some constants (used for the derived paths, which are computed
    after the first pass and may be overridden on their own). Every applied override is also
    recorded in ``namespace['_OVERRIDES']`` so scripts can print it.
    """
    environ = os.environ if environ is None else environ
    candidates = [n for n in (names if names is not None else list(namespace)) if _is_config_name(n)]
    applied: dict[str, tuple[Any, Any]] = {}
    for name in candidates:
        if name not in environ:
            continue
        default = namespace[name]
        value = parse_value(name, environ[name], default)
        namespace[name] = value
        if value != default:
            applied[name] = (default, value)
    record = namespace.setdefault("_OVERRIDES", {})
    record.update(applied)
    return applied


# How close (difflib ratio) an unknown M3_*/CLAMP2_* name must be to a real constant to count as a
# misspelling of it (an error). Other such names belong to other tools (CLAMP2_HOME on a cluster,
# say): they get a one-line warning, never an abort.
MISSPELLING_RATIO = 0.85


def closest_constant(name: str, known) -> str | None:
    """The constant that ``name`` is a near-miss of, or None when it is not close to any."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=MISSPELLING_RATIO)
    return close[0] if close else None


def check_unknown_overrides(namespace: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                            warn=None) -> None:
    """Fail on a misspelt config name in the environment; warn about other unknown reserved names."""
    environ = os.environ if environ is None else environ
    known = [n for n in namespace if _is_config_name(n)]
    unknown = sorted(n for n in environ if n.startswith(RESERVED_PREFIXES) and n not in known)
    misspelt = [(name, closest_constant(name, known)) for name in unknown]
    errors = [f"{name} (did you mean {match}?)" for name, match in misspelt if match]
    if errors:
        raise ConfigError("unknown config override in the environment: " + ", ".join(errors)
                          + "; fix the name or unset it")
    others = [name for name, match in misspelt if not match]
    if others and _is_main_process():
        (warn or _warn)(f"warning: ignoring {', '.join(others)}: not a constant of code/config.py")


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


CLAMP3_VARIANTS = ("saas", "c2")


def check_choice(name: str, value: Any, choices) -> None:
    """A setting that must be one of a few words (e.g. ``CLAMP3_VARIANT``): one line naming them otherwise."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")


def clamp3_weights_name(config: Mapping[str, Any] | Any, variant: str | None = None) -> str:
    """CLaMP 3's weights file name (SPEC_CLAMP3 §12) for ``variant`` (default: the config's CLAMP3_VARIANT).

    The defaults give the two published names exactly; ``config`` is config.py's namespace or module.
    """
    get = config.get if isinstance(config, Mapping) else (lambda name: getattr(config, name))
    variant = variant or get("CLAMP3_VARIANT")
    check_choice("variant", variant, CLAMP3_VARIANTS)
    # A warm-up is named only when there is one, so default runs keep the published names.
    warmup = f"_warmup_{get('CLAMP3_WARMUP_STEPS')}" if get("CLAMP3_WARMUP_STEPS") else ""
    return (f"weights_clamp3_{variant}_h_size_{get('CLAMP3_HIDDEN_SIZE')}"
            f"_t_model_{get('TEXT_MODEL_NAME').replace('/', '_')}_t_length_{get('MAX_TEXT_LENGTH')}"
            f"_a_size_{get('AUDIO_HIDDEN_SIZE')}_a_layers_{get('AUDIO_NUM_LAYERS')}_a_length_{get('MAX_AUDIO_LENGTH')}"
            f"_s_size_{get('M3_HIDDEN_SIZE')}_s_layers_{get('PATCH_NUM_LAYERS')}"
            f"_p_size_{get('PATCH_SIZE')}_p_length_{get('PATCH_LENGTH')}"
            f"{warmup}.pth")


def epoch_weights_path(weights_path: str, epoch: int) -> str:
    """The copy of a checkpoint saved at ``epoch``: ``….pth`` → ``…_{epoch}.pth`` (SPEC_CLAMP3 §12)."""
    stem = weights_path[: -len(".pth")] if weights_path.endswith(".pth") else weights_path
    return f"{stem}_{epoch}.pth"


def derived_log_path(weights_path: str) -> str:
    """The log file of a weights file: every ``weights``→``logs``, then every ``pth``→``txt`` in the
    file name, as the reference's ``WEIGHTS_PATH.replace("weights", "logs").replace("pth", "txt")``
    (the folders are left alone; a name neither changes gets ``.txt`` added, never the weights' own name)."""
    folder, name = os.path.split(weights_path)
    logs = name.replace("weights", "logs").replace("pth", "txt")
    return os.path.join(folder, logs if logs != name else f"{name}.txt")


# What each kind of setting must be; a name matches the first rule whose pattern it fits.
_RULES = (
    (("M3_HIDDEN_SIZE", "AUDIO_HIDDEN_SIZE"), lambda v: v > 0 and v % 64 == 0,
     "a positive multiple of 64 (the encoders use one attention head per 64 dimensions)"),
    (("_SIZE", "_LENGTH", "_NUM_LAYERS", "_NUM_EPOCH"), lambda v: v >= 1, "at least 1"),
    (("_WARMUP_STEPS", "_LEARNING_RATE", "SAVE_EVERY"), lambda v: v >= 0, "0 or more"),  # rate 0: evaluation-only runs; SAVE_EVERY 0: no epoch copies
    (("LOGIT_SCALE",), lambda v: v > 0, "a positive number"),
    (("EVAL_SPLIT",), lambda v: 0 <= v < 1, "a fraction from 0 up to (not including) 1"),
    (("M3_MASK_RATIO",), lambda v: 0 < v < 1, "a fraction between 0 and 1"),
)


def check_ranges(namespace: Mapping[str, Any]) -> None:
    """Fail in one line on a size, length, rate or fraction that no model or run can use (``PATCH_LENGTH=0``)."""
    for name, value in namespace.items():
        if not _is_config_name(name) or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        for endings, valid, expected in _RULES:
            if name.endswith(endings):
                if not valid(value):
                    raise ConfigError(f"{name}={value!r}: expected {expected}; fix the environment override "
                                      f"or code/config.py")
                break
    if "CLAMP3_VARIANT" in namespace:
        check_choice("CLAMP3_VARIANT", namespace["CLAMP3_VARIANT"], CLAMP3_VARIANTS)


def load_config(path: str | os.PathLike, report: bool = True) -> ModuleType:
    """Execute a config file afresh (so the current environment's overrides apply) and return it.

    With ``report`` the values that differ from the defaults are printed once, by the main process.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"clamp2_config_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check_ranges(vars(module))
    if report:
        print_overrides(module)
    return module


def overrides_of(config: ModuleType | Any) -> dict[str, tuple[Any, Any]]:
    return dict(getattr(config, "_OVERRIDES", {}))


def print_overrides(config: ModuleType | Any, file=None) -> None:
    """Print the config values that differ from the defaults (main process only)."""
    if not _is_main_process():
        return
    overrides = overrides_of(config)
    if not overrides:
        return
    file = sys.stderr if file is None else file
    items = ", ".join(f"{k}={v!r} (default {d!r})" for k, (d, v) in overrides.items())
    print(f"config overrides from the environment: {items}", file=file)


def config_dict(config: ModuleType | Any) -> dict[str, Any]:
    """The constants of a config module as a plain dict (stored inside checkpoints)."""
    return {k: getattr(config, k) for k in dir(config)
            if _is_config_name(k) and isinstance(getattr(config, k), (bool, int, float, str, list, tuple, type(None)))}
