"""Images as text for CLaMP 3 (SPEC_CLAMP3 §19): a BLIP caption of each image, then the caption's text feature.

``Salesforce/blip-image-captioning-base`` through transformers' ``BlipProcessor`` and
``BlipForConditionalGeneration``, loaded from a local folder or from the Hugging Face cache only
(nothing is downloaded here). Each image is opened and converted to RGB, given to the processor
without a text prompt (unconditional captioning) and to ``generate`` with the generation settings
the original's transformers 4 took by default (greedy, at most 20 tokens in all; see
:func:`caption_max_length`); the output is decoded with ``skip_special_tokens=True``.

Captions are cached like features (keyed on the image's bytes and the captioner's files), so a
second run on the same images runs no BLIP either.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

BLIP_MODEL = "Salesforce/blip-image-captioning-base"
CAPTION_KIND = "image-caption"
# Part of the caption cache's key: bump it when captions of the same files change.
# 3: the text config's other generation settings too; 2: at most 20 tokens in all, as under transformers 4 (1 took
# transformers 5's 20 new ones).
CAPTION_FORMAT = 3
DEFAULT_MAX_LENGTH = 20  # transformers 4's PretrainedConfig.max_length, which BLIP's text decoder generated with


class CaptionerError(OSError):
    """The captioner cannot be loaded (not downloaded, not a BLIP folder)."""


def _hub_folder(name: str) -> Optional[Path]:
    """The cached snapshot folder of a hub id, or None when it is not in the cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(name, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def folder_fingerprint(folder: Path, cache_dir: Optional[Path]) -> str:
    """sha256 over the folder's files (large weight files hashed once, memoized like checkpoints)."""
    from clamp2.cache import weights_fingerprint

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode("utf-8") + b"\0" + weights_fingerprint(path, cache_dir).encode("ascii") + b"\n")
    return digest.hexdigest()


def captioner_folder(name: str | os.PathLike = BLIP_MODEL) -> Path:
    """The folder of a captioner: ``name`` itself, or the cached snapshot of a hub id (never downloaded)."""
    folder = Path(name)
    if folder.is_dir():
        return folder
    cached = _hub_folder(str(name))
    if cached is None:
        raise CaptionerError(
            f"the image captioner {name} is neither a local folder nor in the Hugging Face cache, and nothing is "
            f"downloaded here: on a machine with network run `hf download {BLIP_MODEL}` "
            f"(or save it to a folder and pass --captioner FOLDER)")
    return cached


def caption_max_length(folder: Path) -> int:
    """The total length (start token included) at which the original's BLIP call stopped.

    The original calls ``generate`` without arguments under transformers 4, where BLIP's text decoder
    took ``max_length`` from its text config (20 unless ``config.json`` says otherwise) as the length
    of the whole output. transformers 5 ignores that config value and by default generates 20 *new*
    tokens after the start token, one more word on captions that reach the cap.
    """
    import json

    try:
        with open(folder / "config.json", encoding="utf-8") as f:
            text_config = json.load(f).get("text_config") or {}
    except (OSError, ValueError, AttributeError):
        return DEFAULT_MAX_LENGTH
    length = text_config.get("max_length") if isinstance(text_config, dict) else None
    return int(length) if isinstance(length, int) and length > 0 else DEFAULT_MAX_LENGTH


# transformers 4's generation defaults that a model config carried (PretrainedConfig's generation attributes),
# which BLIP's text decoder generated with; transformers 5 no longer reads them from the text config.
GENERATION_DEFAULTS = {
    "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1, "num_beam_groups": 1,
    "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
    "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
}


def caption_generation_kwargs(folder: Path) -> dict:
    """The arguments of the original's ``generate()`` under transformers 4: ``max_length`` (see
    :func:`caption_max_length`) and every other generation setting of the text config that is not
    transformers 4's default (``num_beams``, ``min_length``, ``repetition_penalty`` ...)."""
    import json

    kwargs = {"max_length": caption_max_length(folder)}
    try:
        with open(folder / "config.json", encoding="utf-8") as f:
            text_config = json.load(f).get("text_config") or {}
    except (OSError, ValueError, AttributeError):
        return kwargs
    if isinstance(text_config, dict):
        for key, default in GENERATION_DEFAULTS.items():
            if key in text_config and text_config[key] != default:
                kwargs[key] = text_config[key]
    if isinstance(kwargs.get("num_beam_groups"), int) and kwargs["num_beam_groups"] > 1:
        # transformers 5 moved group beam search to code it downloads and runs (trust_remote_code), which this
        # project never does: said once here, not as a ValueError on the first image.
        raise CaptionerError(f"the image captioner {folder} asks for group beam search (num_beam_groups "
                             f"{kwargs['num_beam_groups']} in config.json's text_config), which transformers 5 runs "
                             "only as remote code, never run here; set it to 1 (the published captioner's value)")
    return kwargs


class Captioner:
    """A BLIP captioning model and its processor: ``caption(image path) -> str``."""

    def __init__(self, model, processor, folder: Path, device=None, generation_kwargs: Optional[dict] = None):
        import torch

        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.eval().to(self.device)
        self.processor = processor
        self.folder = Path(folder)
        self.generation_kwargs = (caption_generation_kwargs(self.folder) if generation_kwargs is None
                                  else generation_kwargs)

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike = BLIP_MODEL, device=None) -> "Captioner":
        """From a local folder (``save_pretrained`` layout) or a hub id already in the Hugging Face cache."""
        from transformers import BlipForConditionalGeneration, BlipProcessor

        folder = captioner_folder(name)
        generation_kwargs = caption_generation_kwargs(folder)  # a setting refused before the weights load
        try:
            # PIL's image processor, as transformers 4's BlipProcessor: transformers 5 takes torchvision's
            # where it is installed, whose pixels differ by a level or two.
            processor = BlipProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
            model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CaptionerError(f"cannot load a BLIP captioner from {folder}: {' '.join(str(exc).split())}") from None
        return cls(model, processor, folder, device, generation_kwargs)

    def caption(self, image_path: str | os.PathLike) -> str:
        """The unconditional caption of one image (greedy, at most ``max_length`` tokens in all, and
        the text config's other generation settings: :func:`caption_generation_kwargs`)."""
        import torch
        from PIL import Image

        with Image.open(image_path) as opened:
            image = opened.convert("RGB")
        inputs = self.processor(image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            output = self.model.generate(**inputs, **self.generation_kwargs)
        return self.processor.decode(output[0], skip_special_tokens=True)


@dataclass
class Caption:
    image: Path
    text: str
    cached: bool


def _image_key(path: Path) -> str:
    from clamp2.cache import entry_key

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return entry_key(CAPTION_KIND, digest.hexdigest())


def caption_images(images: Sequence[Path], captioner: str | os.PathLike = BLIP_MODEL, cache=None, device=None,
                   progress: bool = False) -> Tuple[List[Caption], List[Tuple[Path, str]]]:
    """Captions of ``images`` by the captioner ``captioner`` (a folder or a cached hub id).

    With ``cache`` (a :class:`~clamp2.cache.FeatureCache`) captions are keyed on the image's bytes
    and the captioner's files, and the model is loaded only when some image is not cached yet.
    Returns the captions and ``(image, reason)`` of the images that could not be captioned.
    """
    from PIL.Image import DecompressionBombError

    from clamp2.progress import progress_bar

    folder = captioner_folder(captioner)
    model: List[Captioner] = []
    captions: List[Caption] = []
    failures: List[Tuple[Path, str]] = []
    namespace = None
    if cache is not None:
        namespace = cache.namespace({"model": CAPTION_KIND, "captioner": folder_fingerprint(folder, cache.root),
                                     "caption_format": CAPTION_FORMAT},
                                    {"weights": str(folder)})
    bar = progress_bar(total=len(images), desc="captioning", unit="image", enabled=progress)
    try:
        for path in images:
            path = Path(path)
            bar.update(1)
            key = None
            if namespace is not None:
                try:
                    key = _image_key(path)
                except OSError as exc:
                    failures.append((path, f"cannot read: {exc}"))
                    continue
                hit = namespace.get(key)
                if hit is not None:
                    captions.append(Caption(path, bytes(np.asarray(hit, dtype=np.uint8)).decode("utf-8"), True))
                    continue
            if not model:
                model.append(Captioner.from_pretrained(folder, device))
            try:
                text = model[0].caption(path)
            # PIL's UnidentifiedImageError is an OSError; its DecompressionBombError (an image whose header
            # claims more than twice Image.MAX_IMAGE_PIXELS) is neither, and stopped the whole batch
            except (OSError, ValueError, DecompressionBombError) as exc:
                failures.append((path, f"cannot caption: {' '.join(str(exc).split())}"))
                continue
            captions.append(Caption(path, text, False))
            if namespace is not None:
                try:
                    namespace.put(key, np.frombuffer(text.encode("utf-8"), dtype=np.uint8))
                except OSError:
                    pass  # a read-only cache only costs the captioning again
    finally:
        bar.close()
    return captions, failures


def write_caption(caption: str, path: str | os.PathLike) -> None:
    """The caption as ``<stem>.txt``, without a trailing newline (as the reference writes it)."""
    from clamp2.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(caption, encoding="utf-8")
