"""Documentation that runs: every Python block of README.md and docs/*.md, and the
docstring examples of the public API (tb_conceptevo/__init__.py's list).

A block runs as written in a fresh temporary folder, in a namespace that supplies only
the names the prose leaves to the reader: ``model`` (a small CNN taking 1 channel when
the block says ``channels=1``, else 3), ``dataset`` (Fashion-MNIST-shaped, 1,000
images), ``epochs`` and ``train_one_epoch``; a folder ``photos/`` with class subfolders
exists.  A block preceded by ``<!-- excerpt: PATH -->`` must appear verbatim in PATH,
and PATH must be one of the files this module runs (``RUN_HERE``).
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import re
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tb_conceptevo.reading import ConceptReader

from .fashion_like import FashionLike

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: repository files this module runs, so blocks may quote them as excerpts
RUN_HERE = {"examples/own_data.py"}
#: modules whose docstring examples run (the public API of tb_conceptevo/__init__.py);
#: spaces.layout and detectors.text_encoders are left out: their examples do not run yet
DOCTEST_MODULES = [
    "tb_conceptevo.writer", "tb_conceptevo.recording", "tb_conceptevo.observation", "tb_conceptevo.reading",
    "tb_conceptevo.probes.adapters", "tb_conceptevo.probes.concept_shapes", "tb_conceptevo.probes.hashing",
    "tb_conceptevo.spaces.conceptevo", "tb_conceptevo.spaces._neuron_embedding", "tb_conceptevo.spaces.text",
    "tb_conceptevo.spaces.io",
    "tb_conceptevo.detectors.netdissect", "tb_conceptevo.detectors.clip_dissect",
    "tb_conceptevo.detectors.vocabulary", "tb_conceptevo.metrics.anchors", "tb_conceptevo.metrics.evolution",
    "tb_conceptevo.importance", "tb_conceptevo.regularizer", "tb_conceptevo.format.metadata", "tb_conceptevo.format.summary",
    "tb_conceptevo.format.payloads",
]
FENCE = re.compile(r"^```(\w*)\s*$")
EXCERPT = re.compile(r"^<!--\s*excerpt:\s*(\S+)\s*-->$")


def python_blocks(path: Path):
    """``[(first line number, code, excerpt path or None)]`` of the ```python blocks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if match.group(1) == "python":
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            excerpt = EXCERPT.match(before)
            blocks.append((i + 1, "\n".join(lines[i + 1:end]) + "\n", excerpt.group(1) if excerpt else None))
        i = end + 1
    return blocks


BLOCKS = [(path, *block) for path in DOCS for block in python_blocks(path)]


def small_cnn(channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3, stride=2),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 10),
    )


def write_photos(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4) -> None:
    """Images of mixed sizes and modes (8-bit RGB, 16-bit gray, palette, RGBA)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (40 + 7 * i, 30 + 5 * c)
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            kind = i % 4
            if kind == 0:
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
            elif kind == 1:
                Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(folder / f"{i}.png")
            elif kind == 2:
                Image.fromarray(pixels).convert("P").save(folder / f"{i}.png")
            else:
                Image.fromarray(np.dstack([pixels, pixels[..., :1]]), "RGBA").save(folder / f"{i}.png")


def test_every_doc_has_been_looked_at():
    readme = [block for block in BLOCKS if block[0].name == "README.md"]
    assert len(readme) >= 4, "README.md lost its Python blocks (or the parser broke)"
    assert any(excerpt for *_, excerpt in BLOCKS)


@pytest.mark.parametrize("path, line, code, excerpt", BLOCKS,
                         ids=[f"{b[0].name}:{b[1]}" for b in BLOCKS])
def test_python_block_runs_as_written(path, line, code, excerpt, tmp_path, monkeypatch):
    if excerpt is not None:
        assert excerpt in RUN_HERE, f"{path.name}:{line} quotes {excerpt}, which no test runs"
        source = (REPO / excerpt).read_text(encoding="utf-8")
        assert textwrap.dedent(code) in source, f"{path.name}:{line} is not a verbatim excerpt of {excerpt}"
        return
    monkeypatch.chdir(tmp_path)
    write_photos(tmp_path / "photos")
    namespace = {
        "__name__": "__readme__",
        "model": small_cnn(1 if "channels=1" in code else 3),
        "dataset": FashionLike(1000),
        "epochs": 2,
        "train_one_epoch": lambda model: 0.25,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm / library notices are not the point here
        exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
    writer = namespace.get("writer")
    if writer is not None:  # a block that records: its snapshots are in the logs
        writer.close()
        with ConceptReader(str(tmp_path / "runs")) as logs:
            assert logs.runs() and all(logs.steps(run) for run in logs.runs())


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(Path(name).stem, REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_data_example_runs_in_python_and_on_the_command_line(tmp_path, monkeypatch):
    """examples/own_data.py: its probe and model in a training loop and in ``record``,
    and its CLIP-Dissect detector with weights from a local file."""
    from tb_conceptevo import ConceptWriter
    from tb_conceptevo.cli import main
    from tb_conceptevo.detectors import clip_dissect

    monkeypatch.chdir(tmp_path)
    write_photos(tmp_path / "photos")
    example = load_example("examples/own_data.py")
    probe = example.make_probe()
    assert probe.class_names == example.CLASSES and probe.class_order == "model"
    assert len(probe) == 12 and probe.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4

    arch = "ViT-S-32-alt"  # the smallest open_clip architecture: random weights saved to a file
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = clip_dissect.load_open_clip(arch, None)
    weights = tmp_path / "clip_weights" / "tiny.bin"
    weights.parent.mkdir()
    torch.save(clip.state_dict(), weights)
    detector = example.clip_detector(str(weights), arch=arch, concepts=["red", "fur", "stripes"])
    detector.top_k, detector.progress = 3, False

    model = example.make_model()
    writer = ConceptWriter("runs/python", probe=probe, detectors=[detector], progress=False)
    writer.add_concepts(model, step=0)
    writer.close()
    torch.save(model.state_dict(), tmp_path / "epoch_0.pt")
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "epoch_0.pt").rename(tmp_path / "ckpts" / "epoch_0.pt")
    factory, probe_spec = f"{REPO}/examples/own_data.py:make_model", f"{REPO}/examples/own_data.py:make_probe"
    assert main(["record", "--factory", factory, "--checkpoints", "ckpts", "--logdir", "runs", "--run", "cli",
                 "--probe", probe_spec, "--k", "3"]) == 0
    with ConceptReader("runs") as logs:
        assert logs.probe("cli")[0]["probe_hash"] == logs.probe("python")[0]["probe_hash"] == probe.hash
        for layer in logs.layers("python"):
            assert np.array_equal(logs.observation("cli", 0)[layer].image_ids[:, :3],
                                  logs.observation("python", 0)[layer].image_ids[:, :3])
        assert any(tag.startswith("conceptevo/detector/clip_dissect/") for tag in logs.series("python")["python"])


def test_public_api_docstring_examples_run():
    results = {}
    for name in DOCTEST_MODULES:
        module = importlib.import_module(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[name] = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                                            verbose=False, report=True)
    failed = {name: r.failed for name, r in results.items() if r.failed}
    assert not failed, f"docstring examples failed (doctest output above): {failed}"
    assert sum(r.attempted for r in results.values()) >= 40


def test_package_docstring_example_runs(tmp_path, monkeypatch):
    """The literal example of tb_conceptevo's own docstring (``model``, ``epoch`` supplied)."""
    import tb_conceptevo

    doc = tb_conceptevo.__doc__
    start = doc.index("::\n") + 3
    block = []
    for line in doc[start:].splitlines():
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    code = textwrap.dedent("\n".join(block))
    assert "add_concepts" in code
    monkeypatch.chdir(tmp_path)
    namespace = {"model": small_cnn(3), "epoch": 0}
    exec(compile(code, "tb_conceptevo/__init__.py", "exec"), namespace)
    namespace["writer"].close()
    with ConceptReader(str(tmp_path / "runs")) as logs:
        assert logs.steps("baseline") == [0]
