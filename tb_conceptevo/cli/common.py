"""Loading shared by the subcommands: model factories, checkpoints, probe sets."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Callable, Mapping

import torch

#: probe-set names accepted by ``NAME[:key=value,...]`` (``--images``, ``--probe``)
PROBE_NAMES = ("concept_shapes",)


def help_text(doc: str) -> str:
    """A module docstring as ``--help`` text: the whole of it, rst markup removed."""
    return doc.replace("``", "").replace("::\n", ":\n").replace("\\\n", "\\\n").strip()


def load_callable(spec: str, option: str = "--factory", example: str = "mymodels:make_cnn") -> Callable:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the function."""
    if not isinstance(spec, str) or spec.count(":") < 1 or spec.endswith(":") or spec.startswith(":"):
        module, _, function = example.partition(":")
        raise ValueError(
            f"{option} {spec!r} must look like 'module:function' (e.g. '{example}' or "
            f"'path/to/{module}.py:{function}')"
        )
    module_name, _, function_name = spec.rpartition(":")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise FileNotFoundError(f"{option}: file {module_name!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(module_name))[0], module_name)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            raise ValueError(f"{option}: importing {module_name!r} failed: {error!r}") from error
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: local modules are importable
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(
                f"{option}: cannot import module {module_name!r} ({error}); run from the folder "
                f"that contains it or give a path to the .py file"
            ) from error
    function = getattr(module, function_name, None)
    if function is None:
        public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ValueError(
            f"{option}: module {module_name!r} has no attribute {function_name!r}; callables in it: "
            f"{public[:20]}"
        )
    if not callable(function):
        raise ValueError(f"{option}: {spec!r} is not callable")
    return function


def load_factory(spec: str) -> Callable[[], torch.nn.Module]:
    """``--factory module:function`` -> the model-building function."""
    return load_callable(spec, "--factory")


def build_model(factory: Callable[[], torch.nn.Module], spec: str) -> torch.nn.Module:
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    """A state_dict from ``path`` (plain, or under ``'model'``/``'state_dict'``), on the CPU.

    Loaded with ``weights_only=True``: checkpoints cannot run code.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"cannot load checkpoint {path!r} with torch.load(weights_only=True): {error}. Save "
            f"model.state_dict() (optionally inside a dict under 'model' or 'state_dict')"
        ) from error
    if isinstance(state, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"checkpoint {path!r} holds no state_dict: expected {{name: tensor}} or a dict with a "
            f"'model' or 'state_dict' entry"
        )
    return state


def load_checkpoint(model: torch.nn.Module, path: str) -> torch.nn.Module:
    state = dict(load_state_dict(path))
    expected = model.state_dict()
    # DataParallel / DistributedDataParallel checkpoints prefix every key with "module."
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong_shape:
            parts.append(f"wrong shape {wrong_shape[:3]}")
        raise ValueError(f"checkpoint {path!r} does not fit the factory's model: {'; '.join(parts)}")
    model.load_state_dict(state)
    return model


def _parse_value(text: str):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


#: help text of ``--channels`` (image-folder shortcut)
CHANNELS_HELP = "for an image-folder --probe: channels the model takes, 3 (RGB, default) or 1 (grayscale)"

#: help text of every ``--probe`` option
PROBE_HELP = ("the probe set, as the training script builds it: 'module:function' or 'file.py:function' "
              "returning a ProbeSet (e.g. 'myprobes.py:make_probe'); or the shortcuts "
              "'concept_shapes[:n=1024,seed=0,size=64]' and an image folder (sized by --image-size)")


def load_probe(spec: str, image_size: int = 64, option: str = "--probe", class_names=None, channels: int = 3):
    """A ProbeSet from ``spec``: an image folder, ``'concept_shapes:n=1024,seed=0'``, or
    ``'module:function'`` / ``'file.py:function'`` returning a ProbeSet (the same function
    the training script calls, so transforms, channels and sizes match by construction)."""
    from tb_conceptevo import probes

    if os.path.isdir(spec):
        return probes.ImageFolderProbe(spec, size=image_size, class_names=class_names, channels=channels)
    if class_names is not None or channels != 3:
        raise ValueError(f"--class-names and --channels apply to an image-folder {option} only; a probe "
                         f"function sets class_names= and channels= itself")
    name, _, options = spec.partition(":")
    if name not in PROBE_NAMES:
        if ":" not in spec or "=" in options:  # 'name:key=value' is a shortcut with options
            raise ValueError(
                f"{option} {spec!r} is neither a folder nor a probe set ({', '.join(PROBE_NAMES)}), nor "
                f"'module:function'; e.g. {option} myprobes.py:make_probe, {option} "
                f"concept_shapes:n=1024,seed=0 or {option} path/to/images/"
            )
        function = load_callable(spec, option, example="myprobes:make_probe")
        probe = function()
        if not isinstance(probe, probes.ProbeSet):
            raise ValueError(
                f"{option} {spec!r} returned {type(probe).__name__}, not a tb_conceptevo ProbeSet; wrap a "
                f"dataset with probes.DatasetProbe(dataset, ...) or a folder with probes.ImageFolderProbe(...)"
            )
        return probe
    kwargs = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"{option}: option {item!r} must be key=value (e.g. n=1024)")
        kwargs[key.strip()] = _parse_value(value.strip())
    try:
        return probes.ConceptShapes(**kwargs)
    except TypeError as error:
        raise ValueError(f"{option} {spec!r}: {error}") from error


def logged_run(logdir: str, run: str):
    """``(probe header, logged snapshot steps)`` of a run; ``(None, [])`` for a new run.

    Reads the run's own folder only (not the whole logdir)."""
    from tb_conceptevo.format import metadata
    from tb_conceptevo.reading import ConceptReader

    run_dir = os.path.join(logdir, run)
    if "://" not in run_dir and not os.path.isdir(run_dir):
        return None, []
    with ConceptReader(run_dir) as logs:
        tags = logs.series(".").get(".") or {}
        if not tags:
            return None, []
        header = logs.probe(".")[0] if metadata.probe_tag() in tags else None
        return header, logs.steps(".")


def check_probe_matches(probe, header, run: str, option: str = "--probe") -> None:
    """Raise before any work when ``probe`` is not the probe set ``run`` was logged with."""
    if header is None:
        return
    logged = str(header.get("probe_hash", ""))
    if logged and probe.hash != logged:
        raise ValueError(
            f"{option} is not the probe set run {run!r} was logged with: its hash is {probe.hash[:12]}... "
            f"({type(probe).__name__}, {len(probe)} images) but the run's is {logged[:12]}... "
            f"({header.get('probe_type', '?')}, {header.get('n_images', '?')} images); pass the probe the "
            f"training script used, e.g. {option} train.py:make_probe (a function returning it)"
        )
