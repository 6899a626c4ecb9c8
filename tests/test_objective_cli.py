"""`fedrad pretrain --objective byol`: the CLI's choices come from the registry and BYOL trains end to end on
a folder of real DICOM files, writing a backbone that plain timm loads."""

from __future__ import annotations

import timm
from safetensors.torch import load_file

from fedrad.common.losses import OBJECTIVES
from fedrad.common.models import read_metadata
from fedrad.deploy.cli import build_parser, main


def _objective_choices(command: list[str]) -> list[str]:
    sub = build_parser()._subparsers._group_actions[0].choices[command[0]]
    if len(command) > 1:
        sub = sub._subparsers._group_actions[0].choices[command[1]]
    (action,) = [a for a in sub._actions if "--objective" in a.option_strings]
    return list(action.choices)


def test_cli_objective_choices_are_the_registry():
    assert _objective_choices(["pretrain"]) == list(OBJECTIVES)
    assert _objective_choices(["demo"]) == list(OBJECTIVES)
    assert "byol" in OBJECTIVES


def test_pretrain_byol_on_dicom_folder(tmp_path, capsys):
    from fedrad.deploy.synthetic import write_synthetic_sites

    (site,) = write_synthetic_sites(tmp_path / "sites", n_sites=1, patients_per_site=5, images_per_patient=(2, 3),
                                    size=64, seed=3)
    out = tmp_path / "byol.safetensors"
    code = main(["pretrain", str(site), "--objective", "byol", "--model", "test_resnet", "--steps", "3",
                 "--batch-size", "8", "--image-size", "32", "--device", "cpu", "--cache", str(tmp_path / "cache"),
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "loss first" in printed and "held-out" in printed
    assert read_metadata(out)["objective"] == "byol"
    plain = timm.create_model("test_resnet", in_chans=1, num_classes=0)
    plain.load_state_dict(load_file(out))  # strict: only the online backbone, under timm's names


def test_pretrain_rejects_unknown_objective(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "somewhere", "--objective", "moco"])
    assert exc.value.code == 2 and "byol" in capsys.readouterr().err
