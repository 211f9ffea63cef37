"""The attention kernel of every transformer this package builds: one choice, made here.

M3's patch encoder and token decoder (BERT, GPT-2), CLaMP 3's audio encoder (BERT), the text encoder
(XLM-R) and MERT (HuBERT) all compute attention through transformers' dispatch, which picks a kernel
by ``config._attn_implementation``. ``"sdpa"`` is PyTorch's ``scaled_dot_product_attention``: on
CUDA the fused flash / memory-efficient kernels (the padding mask rules out flash, not the
memory-efficient one), on the CPU a fused C++ kernel. ``"eager"`` is the written-out
softmax(QKᵀ/√d)·V of the reference. In fp32 both give the same numbers up to rounding
(``tests/test_attention.py``: ≤ 1e-5 on every model); docs/performance.md gives the bf16 deviation.

transformers 5 already defaults to sdpa for these classes; naming it here keeps the choice explicit
(a transformers upgrade cannot change the kernel silently) and gives one switch,
:func:`set_attention`, for models already built.

Under CUDA autocast (bf16/fp16) every forward pass of the package runs inside :class:`Autocast`, which
also keeps sdpa off cuDNN's attention kernel: see :data:`CUDA_SDPA_BACKENDS` for why.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# The choices and the --attention flag live in a module without torch, so that --help is fast.
from .attention_arguments import check_attention


# The SDPA kernels allowed under CUDA autocast, in PyTorch's own order of preference (flash when there
# is no padding mask, else memory-efficient, math as the fallback). cuDNN's kernel, which PyTorch tries
# first on Hopper in bf16/fp16, is left out: it builds an execution plan on the CPU for each new shape,
# and this package's shapes change from batch to batch (M3's padded lengths, extraction's token
# budgets). Measured on an H200 (torch 2.11, benchmarks/gpu_table.sh): ~6 ms of CPU per attention call
# in M3 training, which left the GPU idle 70% of each step, and bf16 extraction slower than fp32.
# Where shapes repeat, cuDNN's kernel is the faster one: trainers whose batches keep their shapes pass
# ``cudnn_attention=True`` (clamp2.training.tasks.CUDNN_ATTENTION gives the measurements).
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Autocast:
    """``torch.autocast(device_type, dtype)`` that, on CUDA, also limits sdpa to :data:`CUDA_SDPA_BACKENDS`.

    ``cudnn_attention=True`` leaves PyTorch's own kernel choice, cuDNN's included. Reusable and re-entrant
    like ``torch.autocast``: one object can guard every batch of a run. The backward pass follows the
    kernel its forward pass chose, so training needs it around the forward only.
    """

    def __init__(self, device_type: str, dtype: torch.dtype, cudnn_attention: bool = False):
        self.device_type, self.dtype, self.cudnn_attention = device_type, dtype, cudnn_attention
        self._open = []

    def __enter__(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device_type, dtype=self.dtype))
        if self.device_type == "cuda" and not self.cudnn_attention:
            stack.enter_context(sdpa_kernel(list(CUDA_SDPA_BACKENDS)))
        self._open.append(stack)
        return self

    def __exit__(self, *exc_info):
        return self._open.pop().__exit__(*exc_info)


# The per-operator precision flags :class:`ExactFloat32` keeps at fp32 (PyTorch 2.9 on), as (backend, operator).
# cuDNN's pair only where CUDA is: PyTorch starts them in a state that reads "tf32" yet still follows
# ``torch.backends.fp32_precision``, and no setter recreates it, so touching them changes how a caller's later
# global switch acts on them. Where CUDA is, they must be touched (cuDNN's TF32 convolutions are the reason for
# this class); on a CPU-only machine they govern nothing and are left as found.
CUDNN_OPERATORS = (("cudnn", "conv"), ("cudnn", "rnn"))
HOST_OPERATORS = (("cuda", "matmul"), ("mkldnn", "matmul"), ("mkldnn", "conv"))


def _cuda_present() -> bool:
    return torch.cuda.is_available()


def _fp32_operators():
    """The flag objects :class:`ExactFloat32` sets on this machine."""
    names = (CUDNN_OPERATORS if _cuda_present() else ()) + HOST_OPERATORS
    found = []
    for backend, name in names:
        operator = getattr(getattr(torch.backends, backend), name, None)
        if operator is not None and hasattr(operator, "fp32_precision"):
            found.append(operator)
    return found


class SharedOverride:
    """A process-wide setting changed while any thread is inside, and put back when the last one leaves.

    ``apply()`` changes the setting and returns what undoes it. Counting entries (under a lock) keeps
    concurrent callers from saving each other's temporary values: two threads that each saved and
    restored would leave the process with the override on, or turn it off under the other's feet.
    torch.compile runs ``enter`` and ``exit`` eagerly once :func:`keep_overrides_eager` has been called.
    """

    def __init__(self, apply):
        self._apply = apply
        self._lock = threading.Lock()
        self._depth = 0
        self._undo = None

    def enter(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._undo = self._apply()
            self._depth += 1

    def exit(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                undo, self._undo = self._undo, None
                undo()


_EAGER_UNDER_COMPILE = threading.Lock()


def keep_overrides_eager() -> None:
    """Have torch.compile run :class:`SharedOverride`'s enter and exit as they are, outside its graphs.

    Neither a lock nor PyTorch's flag setters can be traced: dynamo would break the graph there with a
    warning per builtin. Called before compiling (``compile_runners``), not at import, because
    ``torch.compiler.disable`` imports torch._dynamo, which cost every script 1.2 s at start.
    """
    with _EAGER_UNDER_COMPILE:
        for name in ("enter", "exit"):
            method = SharedOverride.__dict__[name]
            if not getattr(method, "_clamp2_eager", False):
                eager = torch.compiler.disable(method)
                eager._clamp2_eager = True
                setattr(SharedOverride, name, eager)


def _legacy_reading(getter):
    try:
        return getter()
    except RuntimeError:  # the per-operator flags disagree with the legacy view, which then does not read
        return None


def _fp32_flags_on():
    """This machine's TF32/bf16 shortcut flags (:func:`_fp32_operators`) set to fp32; returns what puts them back.

    PyTorch 2.9 on keeps a legacy switch beside the per-operator flags (``cudnn.allow_tf32``, the matmul
    precision); its getter reads only while the two agree. Where it reads, it is switched too, first (its
    setter rewrites the per-operator flags), so legacy readers (inductor among them) see fp32 inside. Then
    every per-operator flag not at "ieee" is set to it. The getters give the value in force, inherited or
    not, so on the way out, after the legacy switches, a changed flag first goes back to inheriting
    ("none"), and is written explicitly only where that reads otherwise: a caller's later
    ``torch.backends.fp32_precision = ...`` still reaches the flags that followed it.
    """
    backends = torch.backends
    operators = _fp32_operators()
    entry = [operator.fp32_precision for operator in operators]
    legacy_undo = []
    if _cuda_present():
        allow_tf32 = _legacy_reading(lambda: backends.cudnn.allow_tf32)
        if allow_tf32:
            backends.cudnn.allow_tf32 = False
            legacy_undo.append(lambda: setattr(backends.cudnn, "allow_tf32", allow_tf32))
    matmul = _legacy_reading(torch.get_float32_matmul_precision)
    if matmul not in (None, "highest"):
        torch.set_float32_matmul_precision("highest")
        legacy_undo.append(lambda: torch.set_float32_matmul_precision(matmul))
    for operator, precision in zip(operators, entry):
        if precision != "ieee":
            operator.fp32_precision = "ieee"

    def undo():
        for restore in legacy_undo:
            restore()
        for operator, precision in zip(operators, entry):
            if operator.fp32_precision != precision:
                operator.fp32_precision = "none"
                if operator.fp32_precision != precision:
                    operator.fp32_precision = precision

    return undo


_FP32_FLAGS = SharedOverride(_fp32_flags_on)


class ExactFloat32:
    """fp32 computed in fp32: TF32 (and bf16) shortcuts off for convolutions and matrix products; restored on exit.

    PyTorch's defaults let cuDNN round a float32 convolution's inputs to TF32 (a 10-bit mantissa) on
    Ampere and later, so MERT's convolutional feature encoder and positional convolution would differ
    from the CPU's (and from fp32) by ~1e-3 relative on a GPU; matrix products are fp32 unless a
    caller has set ``torch.set_float32_matmul_precision("high")``, ``torch.backends.fp32_precision =
    "tf32"`` (what transformers' ``TrainingArguments(tf32=True)`` does) or a backend's own flag. Every
    fp32 forward pass of the extraction and the search's products run inside one, so fp32 means the
    same numbers on every device (up to the order of sums). A caller's ``torch.autocast`` (a
    per-thread setting) is switched off inside too. Reusable, re-entrant and thread-safe: the
    process-wide flags are set by the first thread in and put back by the last one out
    (:class:`SharedOverride`); enter and exit each context in one thread (a generator paused inside and
    closed from another thread puts the flags back, not its thread's autocast).

    PyTorch 2.9 on has two views of these flags: the legacy ones (``cudnn.allow_tf32``,
    ``get_float32_matmul_precision``) and the per-operator ``fp32_precision`` (:func:`_fp32_flags_on` sets
    these; where the legacy getters read, they usually read fp32 inside). The values in force come back on
    exit. One state cannot: where CUDA is, cuDNN's untouched flags come back as an explicit "tf32" (the same convolutions),
    which a later ``torch.backends.fp32_precision = "ieee"`` no longer overrides; set
    ``torch.backends.cudnn.conv.fp32_precision`` itself for that. And a flag a caller pinned to the value
    it would inherit comes back inheriting it (PyTorch's getters cannot tell the two apart).
    """

    def __init__(self):
        self._local = threading.local()  # this thread's open autocast switches, innermost last

    def __enter__(self):
        _FP32_FLAGS.enter()
        # A caller's own autocast (an API call inside a bf16 training loop) would make this pass bf16.
        # Entered only when on: torch.compile traces these passes (extraction's --compile), and dynamo cannot
        # trace an autocast switched off from inside a context manager's methods.
        no_autocast = contextlib.ExitStack()
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                no_autocast.enter_context(torch.autocast(device_type, enabled=False))
        self._open().append(no_autocast)
        return self

    def __exit__(self, *exc_info):
        try:
            opened = self._open()
            if opened:  # empty when a generator paused inside is closed from another thread: its autocast is its own
                opened.pop().__exit__(*exc_info)
        finally:
            _FP32_FLAGS.exit()  # whatever happened above, or the process would stay at fp32 for good
        return False

    def _open(self) -> list:
        if not hasattr(self._local, "open"):
            self._local.open = []
        return self._local.open


def set_attention(model, implementation: str):
    """Switch every transformers model inside ``model`` (an ``nn.Module``) to ``implementation``; returns ``model``.

    Weights are untouched: only the kernel that computes attention changes, from the next forward pass on.
    """
    from transformers import PreTrainedModel

    check_attention(implementation)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.set_attn_implementation(implementation)
    return model


def attention_of(model) -> set:
    """The attention implementations in use by the transformers models inside ``model``."""
    from transformers import PreTrainedModel

    return {module.config._attn_implementation for module in model.modules() if isinstance(module, PreTrainedModel)}
