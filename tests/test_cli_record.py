"""tb-conceptevo record: snapshots for a folder of checkpoints."""


import pytest
import torch

from tb_conceptevo.cli import main
from tb_conceptevo.cli.record import checkpoint_steps
from tb_conceptevo.reading import LogReader
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
    with LogReader(str(tmp_path / "logs")) as logs:
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
