"""Real-data workflow, Fashion-MNIST-shaped (1-channel 28 px Dataset made here, small
model): ConceptWriter during "training", then the CLI on the saved checkpoints with the
same probe function (``record``, ``fit-space``, ``project``, ``importance --class
<name>``), then the plugin's routes through TensorBoard's WSGI app."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from tb_conceptevo import probes
from tb_conceptevo.format import metadata
from tb_conceptevo.cli import main
from tb_conceptevo.reading import ConceptReader
from tb_conceptevo.writer import ConceptWriter

from .fashion_like import FASHION_CLASSES, FashionLike, fashion_cnn

N_IMAGES = 120
BAG = FASHION_CLASSES.index("Bag")  # 8; sorted folder order would make it 1


def make_probe() -> probes.ProbeSet:
    """The probe the training script uses (and the CLI, via --probe)."""
    return probes.DatasetProbe(FashionLike(N_IMAGES), channels=1, transform=lambda x: (x - 0.286) / 0.353)


def make_model() -> torch.nn.Module:
    return fashion_cnn(0)


def _train_step(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for an epoch: a fixed, seeded change of every weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def _events(folder) -> list:
    return sorted(n for n in os.listdir(folder) if n.startswith("events.out.tfevents.")) if os.path.isdir(folder) else []


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    logdir, ckpts = root / "runs", root / "ckpts"
    ckpts.mkdir()
    model = make_model()
    writer = ConceptWriter(str(logdir / "live"), probe=make_probe(), k=4, progress=False)
    for epoch in (1, 2, 3):
        _train_step(model, epoch)
        writer.add_concepts(model, step=epoch)
        torch.save(model.state_dict(), ckpts / f"epoch_{epoch}.pt")
    writer.close()
    spec = dict(factory="tests.test_cli_fashion:make_model", probe="tests.test_cli_fashion:make_probe")
    return root, logdir, ckpts, spec


def test_record_replays_the_live_run_with_the_same_probe_function(workflow, capsys):
    root, logdir, ckpts, spec = workflow
    assert main(["record", "--factory", spec["factory"], "--checkpoints", str(ckpts), "--logdir", str(logdir),
                 "--run", "replay", "--probe", spec["probe"], "--k", "4"]) == 0
    with ConceptReader(str(logdir)) as logs:
        assert logs.steps("replay") == logs.steps("live") == [1, 2, 3]
        assert logs.probe("replay")[0]["probe_hash"] == logs.probe("live")[0]["probe_hash"]
        assert logs.probe("replay")[0]["class_names"] == FASHION_CLASSES
        for step in (1, 2, 3):
            live, replay = logs.observation("live", step), logs.observation("replay", step)
            for layer in logs.layers("live"):
                assert np.array_equal(live[layer].image_ids, replay[layer].image_ids)
                assert np.array_equal(live[layer].activations, replay[layer].activations)
    # again: every step is logged already, nothing is written twice
    events = _events(logdir / "replay")
    assert main(["record", "--factory", spec["factory"], "--checkpoints", str(ckpts), "--logdir", str(logdir),
                 "--run", "replay", "--probe", spec["probe"]]) == 0
    assert "nothing to do" in capsys.readouterr().out and _events(logdir / "replay") == events


def test_record_refuses_another_probe_and_leaves_no_phantom_run(workflow, capsys):
    root, logdir, ckpts, spec = workflow
    events = _events(logdir / "live")
    # the default 64 px RGB folder-style probe is not the one the run logged: refused before any work
    code = main(["record", "--factory", spec["factory"], "--checkpoints", str(ckpts), "--logdir", str(logdir),
                 "--run", "live", "--probe", "concept_shapes:n=20,size=28"])
    err = capsys.readouterr().err
    assert code == 2 and "not the probe set run 'live' was logged with" in err and "--probe" in err
    assert _events(logdir / "live") == events
    # a probe the model cannot take (3 channels into a 1-channel model): no event file, no run folder
    code = main(["record", "--factory", spec["factory"], "--checkpoints", str(ckpts), "--logdir", str(logdir),
                 "--run", "phantom", "--probe", "concept_shapes:n=20,size=28"])
    assert code == 2 and "channels" in capsys.readouterr().err
    assert not (logdir / "phantom").exists()
    with ConceptReader(str(logdir)) as logs:
        assert "phantom" not in logs.runs()


def test_fit_space_project_and_a_refit_under_its_own_name(workflow, capsys):
    root, logdir, _, _ = workflow
    fit = ["fit-space", "--logdir", str(logdir), "--run", "live", "--dim", "4", "--epochs", "2",
           "--repetitions", "1", "--k", "4", "--no-progress"]
    space = root / "space.npz"
    assert main(fit + ["--out", str(space)]) == 0
    project = ["project", "--logdir", str(logdir), "--no-progress", "--runs", "live,replay"]
    assert main(project + ["--space", str(space)]) == 0
    assert "back-filled 6 step(s) of 2 run(s) into space 'conceptevo'" in capsys.readouterr().out
    assert main(project + ["--space", str(space)]) == 0
    assert "nothing to do" in capsys.readouterr().out

    refit = root / "refit.npz"
    assert main(fit + ["--out", str(refit), "--seed", "1"]) == 0
    capsys.readouterr()
    assert main(project + ["--space", str(refit)]) == 2  # never a silent skip
    err = capsys.readouterr().err
    assert "is not the space already logged as 'conceptevo'" in err and "--name conceptevo_2" in err
    assert main(project + ["--space", str(refit), "--name", "conceptevo_seed1"]) == 0
    assert "into space 'conceptevo_seed1'" in capsys.readouterr().out
    with ConceptReader(str(logdir)) as logs:
        layer = logs.layers("live")[0]
        assert logs.space_steps("live", "conceptevo_seed1", layer) == [1, 2, 3]
        assert logs.space_steps("live", "conceptevo", layer) == [1, 2, 3]
        first = logs.embedding("live", "conceptevo", layer, 3).vectors
        second = logs.embedding("live", "conceptevo_seed1", layer, 3).vectors
        assert not np.allclose(np.nan_to_num(first), np.nan_to_num(second))


def test_importance_by_class_name_scores_the_models_class(workflow, capsys):
    root, logdir, ckpts, spec = workflow
    base = ["importance", "--factory", spec["factory"], "--from", str(ckpts / "epoch_1.pt"),
            "--to", str(ckpts / "epoch_3.pt"), "--logdir", str(logdir), "--run", "live",
            "--from-step", "1", "--to-step", "3", "--no-progress"]
    assert main(base + ["--class", "Bag", "--probe", spec["probe"]]) == 0
    out = capsys.readouterr().out
    assert f"class {BAG} (Bag): {N_IMAGES // 10} images" in out
    with ConceptReader(str(logdir)) as logs:
        header, _ = logs.payload("live", metadata.importance_tag(BAG, logs.layers("live")[0]), 3)
        assert header["class_index"] == BAG and header["class_name"] == "Bag"

    # the same images exported as a folder with one subfolder per class name, as users do
    folder = root / "folder"
    data = FashionLike(N_IMAGES)
    for i in range(N_IMAGES):
        name = FASHION_CLASSES[data.targets[i]].replace("/", "-")
        (folder / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.data[i], "L").save(folder / name / f"{i:04d}.png")
    folder_base = [a if a != "live" else "other" for a in base] + ["--image-size", "28", "--probe", str(folder)]
    code = main(folder_base + ["--class", "Bag"])  # sorted folders make Bag index 1: refused, mapping listed
    err = capsys.readouterr().err
    assert code == 2 and "sorted folder names" in err and "1='Bag'" in err and "--class-names" in err
    # 3 channels into the 1-channel model: a clear error, nothing written
    names = ",".join(n.replace("/", "-") for n in FASHION_CLASSES)
    code = main(folder_base + ["--class", "Bag", "--class-names", names])
    assert code == 2 and "channels" in capsys.readouterr().err
    assert not (logdir / "other").exists()
    # the model's class order and channel count: the model's Bag, on the same images as the Dataset
    assert main(folder_base + ["--class", "Bag", "--class-names", names, "--channels", "1"]) == 0
    assert f"class {BAG} (Bag): {N_IMAGES // 10} images" in capsys.readouterr().out

    # a probe whose names are not the logged ones cannot resolve a name against the run
    code = main(base + ["--class", "Coat", "--probe", "concept_shapes:n=30,size=28"])
    assert code == 2 and "not the probe set run 'live' was logged with" in capsys.readouterr().err


def test_the_plugin_serves_the_workflow(workflow):
    from .test_plugin import fetcher, make_app

    _, logdir, _, _ = workflow
    app, _, close = make_app(str(logdir), "python")
    try:
        fetch = fetcher(app)
        runs = {r["run"]: r for r in fetch("runs").json()["runs"]}
        assert {"live", "replay"} <= set(runs)
        live = runs["live"]
        assert live["steps"] == [1, 2, 3] and {"conceptevo", "conceptevo_seed1"} <= set(live["spaces"])
        layer = live["layers"][0]
        probe = fetch("probe?run=live").json()
        assert probe["n_images"] == N_IMAGES and probe["class_names"] == FASHION_CLASSES
        assert fetch("atlas?run=live&index=0").headers["content-type"] == "image/png"
        body = fetch(f"map?run=live&space=conceptevo&layer={layer}&step=3").body
        assert int.from_bytes(body[:4], "little") == 6  # channels of the first conv
        story = fetch(f"neuron?run=live&layer={layer}&channel=2&step=3&space=conceptevo").json()
        assert [p["step"] for p in story["trajectory"]] == [1, 2, 3] and len(story["stimuli"]) == 4
        importance = fetch(f"importance?run=live&class={BAG}&layer={layer}").json()
        assert importance["class_name"] == "Bag" and len(importance["importance"]) == 6
        metrics = fetch("metrics?run=live")
        assert metrics.status == 200
    finally:
        close()
