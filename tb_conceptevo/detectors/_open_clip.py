"""The one place that talks to open_clip: models, tokenizers, preprocessing, encoding.

Used by :class:`~.clip_dissect.CLIPDissect`, :class:`~.text_encoders.OpenCLIPTextEncoder`
and :class:`~tb_conceptevo.regularizer.CLIPConcepts`, so all three load weights, read
the preprocessing config and run the towers the same way.  open_clip is imported
lazily: the package works without it until a CLIP model is asked for.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def load_open_clip(model_name: str, pretrained: Optional[str] = None, device=None):
    """An open_clip model in eval mode from a local file, a pretrained tag or random weights.

    Raises:
        ValueError: unknown architecture or tag.
        RuntimeError: the tag's weights cannot be fetched (offline); the message says how
            to pass a local file instead.
    """
    import open_clip

    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {model_name!r}; see open_clip.list_models()")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if pretrained is None:
        warnings.warn(f"CLIPDissect: {model_name} with random weights (pretrained=None): labels are "
                      "meaningless; pass pretrained=<file or tag> for real labels", UserWarning, stacklevel=3)
        model = open_clip.create_model(model_name, pretrained=None, device=device)
    elif os.path.exists(str(pretrained)):
        path = Path(pretrained)
        if not path.is_file():
            raise ValueError(f"pretrained={str(path)!r} is not a file; pass the checkpoint file itself")
        try:
            model = open_clip.create_model(model_name, pretrained=str(path), device=device)
        except Exception as exc:  # any loading failure: wrong architecture or corrupt file
            raise ValueError(
                f"could not load {str(path)!r} as {model_name} weights ({type(exc).__name__}: {exc}); "
                "check that the file is an open_clip/OpenAI checkpoint of this architecture"
            ) from None
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ValueError(
                f"pretrained={pretrained!r} is neither an existing file nor an open_clip tag of {model_name} "
                f"(tags: {tags}); pass the path of a local checkpoint file"
            )
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
        except Exception as exc:  # network errors come in many types
            raise RuntimeError(
                f"could not fetch the {model_name} weights {pretrained!r} ({type(exc).__name__}: "
                f"{str(exc)[:200]}). Without network access, download them on a machine with network, e.g. "
                f"python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{pretrained}', "
                f"cache_dir='clip_weights')\", copy the checkpoint file (open_clip_pytorch_model.bin or "
                f"*.safetensors / *.pt under clip_weights/) here and pass "
                f"CLIPDissect('{model_name}', pretrained='/path/to/that/file')"
            ) from None
    model.eval()
    return model


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes, bytes).

    Cached on the model object: CLIP models are frozen here."""
    cached = getattr(model, "_tb_conceptevo_weights_hash", None)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    value = digest.hexdigest()
    try:
        object.__setattr__(model, "_tb_conceptevo_weights_hash", value)
    except AttributeError:  # pragma: no cover
        pass
    return value


def tokenizer(model_name: str):
    """open_clip's tokenizer of the architecture ``model_name``."""
    import open_clip

    return open_clip.get_tokenizer(model_name)


def preprocess_config(model: torch.nn.Module) -> Dict:
    """``{"size": (H, W), "mean": (3,), "std": (3,)}`` of the model's image preprocessing
    (open_clip's config, else its image size and the OpenAI statistics)."""
    import open_clip

    cfg = dict(open_clip.get_model_preprocess_cfg(model) or {})
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    return {"size": size, "mean": tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            "std": tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))}


def encode_images(model: torch.nn.Module, images: torch.Tensor, cfg: Dict) -> torch.Tensor:
    """float32 unit image features ``[B, D]`` of images ``[B, 3, H, W]`` in [0, 1] (on the
    images' device), preprocessed as ``cfg`` (:func:`preprocess_config`) says."""
    images = resize_center_crop(images, cfg["size"])
    mean = torch.tensor(cfg["mean"], device=images.device)[None, :, None, None]
    std = torch.tensor(cfg["std"], device=images.device)[None, :, None, None]
    return F.normalize(model.encode_image((images - mean) / std).float(), dim=1)


def encode_texts(model: torch.nn.Module, tokenize, texts: Sequence[str], device, batch_size: int,
                 normalise: bool) -> torch.Tensor:
    """float32 text features ``[n, D]`` on CPU, ``batch_size`` texts per pass (``tokenize``:
    from :func:`tokenizer`); ``normalise``: L2-normalised on the model's device."""
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            tokens = tokenize(list(texts[start:start + batch_size])).to(device)
            features = model.encode_text(tokens).float()
            chunks.append((F.normalize(features, dim=1) if normalise else features).cpu())
    return torch.cat(chunks)


def resize_center_crop(images: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize the shorter side to the target and centre-crop (open_clip's "shortest" mode)."""
    height, width = images.shape[-2:]
    target_h, target_w = size
    scale = max(target_h / height, target_w / width)
    new_h, new_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    if (new_h, new_w) != (height, width):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False,
                               antialias=new_h < height).clamp(0.0, 1.0)
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return images[..., top:top + target_h, left:left + target_w]
