"""tb-conceptevo record: snapshots for a folder of checkpoints."""


import pytest
import torch

from tb_conceptevo.cli import main
from tb_conceptevo.cli.record import checkpoint_steps
from tb_conceptevo.reading import ConceptReader
from tests.test_recording import Branchy


def make_branchy():
    torch.manual_seed(0)
    return Branchy()


def test_record_checkpoints(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    model = make_branchy()
    for epoch in (2, 10):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        torch.save({"model": model.state_dict()}, ckpts / f"epoch_{epoch}.pt")
    code = main(["record", "--factory", "tests.test_cli_record:make_branchy", "--checkpoints", str(ckpts),
                 "--logdir", str(tmp_path / "logs"), "--run", "r", "--probe", "concept_shapes:n=40,size=16",
                 "--k", "3", "--layers", "left,right"])
    assert code == 0
    with ConceptReader(str(tmp_path / "logs")) as logs:
        assert logs.steps("r") == [2, 10]
        assert logs.layers("r") == ["left", "right"]
        assert logs.observation("r", 10)["left"].image_ids.shape == (6, 3)


def test_checkpoint_step_rules(tmp_path):
    for name in ("b.pt", "a.pth", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [s for s, _ in checkpoint_steps(str(tmp_path))] == [0, 1]  # no numbers: name order
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no checkpoints"):
        checkpoint_steps(str(empty))
    clash = tmp_path / "clash"
    clash.mkdir()
    for name in ("run1_e3.pt", "run2_e3.pt"):
        (clash / name).write_bytes(b"")
    with pytest.raises(ValueError, match="same step twice"):
        checkpoint_steps(str(clash))


def test_record_bad_factory_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "e1.pt").write_bytes(b"")
    code = main(["record", "--factory", "nope", "--checkpoints", str(tmp_path), "--logdir", str(tmp_path / "l"),
                 "--run", "r"])
    assert code == 2
    err = capsys.readouterr().err
    assert "module:function" in err and "Traceback" not in err


def make_not_a_probe():
    return [1, 2, 3]


def make_small_probe():
    from tb_conceptevo import probes

    return probes.ConceptShapes(n=24, size=16)


@pytest.mark.parametrize("command", [[], ["record"], ["fit-space"], ["project"], ["importance"]])
def test_every_help_is_complete_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        main(command + ["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    example_lines = [line.strip() for line in text.splitlines() if line.strip().startswith("tb-conceptevo ")]
    wanted = "tb-conceptevo " + (command[0] if command else "record") + " --"
    assert any(line.startswith(wanted) for line in example_lines), f"no example command in {command} --help"
    assert "::" not in text and "``" not in text  # rst markup is not left in the help
    if command == ["record"]:
        assert "look later" in text and "--probe myprobes.py:make_probe" in text and "no event file" in text


def test_probe_function_is_the_training_scripts_probe(tmp_path, capsys):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save(make_branchy().state_dict(), ckpts / "e1.pt")
    common = ["record", "--factory", "tests.test_cli_record:make_branchy", "--checkpoints", str(ckpts),
              "--logdir", str(tmp_path / "logs"), "--k", "2"]
    assert main(common + ["--run", "a", "--probe", "tests.test_cli_record:make_small_probe"]) == 0
    with ConceptReader(str(tmp_path / "logs")) as logs:
        assert logs.probe("a")[0]["probe_hash"] == make_small_probe().hash
    assert main(common + ["--run", "b", "--probe", "tests.test_cli_record:make_not_a_probe"]) == 2
    err = capsys.readouterr().err
    assert "returned list, not a tb_conceptevo ProbeSet" in err and "DatasetProbe" in err
    assert not (tmp_path / "logs" / "b").exists()
    assert main(common + ["--run", "b", "--probe", "tests.test_cli_record:nope"]) == 2
    assert "--probe: module 'tests.test_cli_record' has no attribute 'nope'" in capsys.readouterr().err


def test_class_names_resolve_only_in_the_models_order(tmp_path):
    from PIL import Image

    from tb_conceptevo import probes
    from tb_conceptevo.cli.importance import resolve_class

    for name in ("Trouser", "Bag", "Coat"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / name / "x.png")
    folders = probes.ImageFolderProbe(tmp_path, size=8)
    assert folders.class_names == ["Bag", "Coat", "Trouser"] and folders.class_order == "folders"
    assert resolve_class("1", folders) == 1  # an index is the model's index
    with pytest.raises(ValueError, match=r"sorted folder names \(0='Bag', 1='Coat', 2='Trouser'\)"):
        resolve_class("Bag", folders)
    model_order = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag"]
    named = probes.ImageFolderProbe(tmp_path, size=8, class_names=model_order)
    assert named.class_order == "model" and named.labels.tolist() == [8, 4, 1]
    assert resolve_class("Bag", named) == 8 and resolve_class("Bag", named, {"class_names": model_order}) == 8
    with pytest.raises(ValueError, match="differ from those run logged"):
        resolve_class("Bag", named, {"class_names": list(reversed(model_order)), "class_order": "model"})
    with pytest.raises(ValueError, match=r"folders \['Bag'\] .* are not in class_names"):
        probes.ImageFolderProbe(tmp_path, size=8, class_names=["Trouser", "Coat"])
    with pytest.raises(ValueError, match="neither an index nor a class name"):
        resolve_class("Hat", named)
