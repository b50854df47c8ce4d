"""Every kind/arch builds, runs a tiny forward pass, and survives save -> load unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from marrowscope.errors import InvalidInput
from marrowscope.models import (
    ARCHS,
    ModelConfigError,
    ModelFormatError,
    build_model,
    load_model,
    make_config,
    model_digest,
    save_model,
)
from marrowscope.taxonomy import ATTRIBUTE_CODES

FEATURES = ["frac_BLA", "frac_attr_auer_rod", "mean_cell_area", "n_cells_log"]


def tiny_config(kind: str, arch: str) -> dict:
    if kind == "detector":
        return make_config(kind, arch, classes=["BLA", "LYT", "RBC"], min_size=64, max_size=96)
    if kind == "celltype":
        return make_config(
            kind, arch, crop_size=32, outputs=["BLA", "LYT", "MON", *ATTRIBUTE_CODES]
        )
    if kind == "ensemble":
        return make_config(kind, arch, feature_names=FEATURES, hidden=[8], dropout=0.1)
    return make_config(kind, arch, input_size=[64, 80])


CASES = [  # mil: its own round trip in tests/models/test_mil.py (needs lineage keys)
    (kind, arch)
    for kind, archs in ARCHS.items()
    for arch in archs
    if arch != "xception65" and kind != "mil"
]


def tiny_input(kind: str, config: dict):
    g = torch.Generator().manual_seed(0)
    if kind == "detector":
        return [torch.rand(3, 72, 88, generator=g)]
    if kind == "celltype":
        return torch.rand(2, 3, 32, 32, generator=g)
    if kind == "ensemble":
        return torch.randn(3, len(FEATURES), generator=g)
    return torch.rand(2, 3, *config["input_size"], generator=g)


def outputs_of(module, x) -> list[torch.Tensor]:
    with torch.inference_mode():
        y = module(x)
    if isinstance(y, list):  # detector: one dict per image
        return [y[0]["boxes"], y[0]["scores"], y[0]["labels"].float()]
    return [y]


@pytest.mark.parametrize(("kind", "arch"), CASES, ids=[f"{k}-{a}" for k, a in CASES])
def test_save_load_roundtrip_gives_identical_outputs(tmp_path, kind, arch):
    torch.manual_seed(0)
    config = tiny_config(kind, arch)
    module = build_model(config).eval()
    x = tiny_input(kind, config)
    before = outputs_of(module, x)
    path = save_model(module, config, tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(path)
    assert loaded.config == config
    assert loaded.digest == model_digest(path) and len(loaded.digest) == 64
    assert not loaded.module.training
    after = outputs_of(loaded.module, x)
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_xception65_builds():
    module = build_model(tiny_config("celltype", "xception65"))
    assert module.head.in_features == 2048


@pytest.fixture
def saved_ensemble(tmp_path):
    config = tiny_config("ensemble", "mlp")
    module = build_model(config)
    module.fit_standardisation(torch.randn(20, len(FEATURES)) * 5 + 3)
    return save_model(module, config, tmp_path / "ens"), module


def test_digest_changes_with_weights(saved_ensemble, tmp_path):
    path, module = saved_ensemble
    first = model_digest(path)
    with torch.no_grad():
        module.mlp[0].weight.add_(1.0)
    other = save_model(module, json.loads((path / "config.json").read_text()), tmp_path / "ens2")
    assert model_digest(other) != first
    assert model_digest(path) == first


def test_pickle_only_directory_is_refused(saved_ensemble):
    path, module = saved_ensemble
    (path / "model.safetensors").unlink()
    torch.save(module.state_dict(), path / "model.pt")
    with pytest.raises(ModelFormatError, match="pickle files are refused"):
        load_model(path)


def test_pickle_disguised_as_safetensors_is_refused(saved_ensemble):
    path, module = saved_ensemble
    torch.save(module.state_dict(), path / "model.safetensors")
    with pytest.raises(ModelFormatError, match="refusing to unpickle"):
        load_model(path)


def test_missing_key_names_the_key(saved_ensemble):
    from safetensors.torch import load_file, save_file

    path, _ = saved_ensemble
    state = load_file(str(path / "model.safetensors"))
    del state["feature_std"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="missing keys.*feature_std"):
        load_model(path)


def test_config_mismatching_weights_is_refused(saved_ensemble):
    path, _ = saved_ensemble
    config = json.loads((path / "config.json").read_text())
    config["hidden"] = [4]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="shape mismatch"):
        load_model(path)


def test_missing_config_or_directory(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_model(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_model(tmp_path / "empty")


@pytest.mark.parametrize(
    ("kind", "arch", "fields", "message"),
    [
        ("detector", "fasterrcnn_resnet50_fpn", {"classes": []}, "classes"),
        ("detector", "yolo", {}, "unknown arch"),
        ("celltype", "tiny_cnn", {"outputs": ["auer_rod", "BLA"]}, "cell codes first"),
        ("celltype", "tiny_cnn", {"outputs": ["XYZ"]}, "neither cell codes"),
        ("celltype", "tiny_cnn", {"cell_head": "relu"}, "cell_head"),
        ("celltype", "cellnet", {"stain_norm": "macenko"}, "stain_norm"),
        ("celltype", "cellnet", {"logit_bias": {"auer_rod": 1.0}}, "logit_bias"),
        ("ensemble", "mlp", {}, "feature_names"),
        ("npm1", "resnet18", {"input_size": [64]}, r"\[H, W\]"),
        ("npm1", "resnet18", {"std": [0, 1, 1]}, "positive"),
    ],
)
def test_bad_configs_are_rejected(kind, arch, fields, message):
    with pytest.raises(ModelConfigError, match=message):
        make_config(kind, arch, **fields)


def test_celltype_probabilities_and_loss():
    from marrowscope.models.celltype import celltype_loss

    for head in ("sigmoid", "softmax"):
        config = make_config(
            "celltype",
            "tiny_cnn",
            crop_size=32,
            cell_head=head,
            outputs=["BLA", "LYT", "MON", *ATTRIBUTE_CODES],
        )
        model = build_model(config).eval()
        crops = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
        probs = model.predict_proba(crops)
        assert probs.shape == (4, 3 + len(ATTRIBUTE_CODES)) and probs.dtype == torch.float32
        assert ((probs >= 0) & (probs <= 1)).all()
        cell_sums = probs[:, :3].sum(1)
        if head == "softmax":
            torch.testing.assert_close(cell_sums, torch.ones(4))
        assert model.predict_proba(torch.zeros((0, 32, 32, 3), dtype=torch.uint8)).shape == (0, 7)
        logits = model(torch.rand(4, 3, 32, 32))
        attrs = torch.randint(0, 2, (4, len(ATTRIBUTE_CODES))).float()
        loss = celltype_loss(logits, torch.tensor([0, 1, 2, 0]), attrs, cell_head=head)
        assert loss.ndim == 0 and loss.item() > 0
        loss.backward()
        with pytest.raises(InvalidInput, match="cell_targets"):
            celltype_loss(logits, torch.tensor([0, 1, 2, 3]), attrs, cell_head=head)


def test_logit_bias_moves_the_decision_and_travels_with_the_config(tmp_path):
    config = make_config("celltype", "tiny_cnn", crop_size=32, outputs=["BLA", "LYT"])
    model = build_model(config).eval()
    crops = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    before = model.predict_proba(crops)
    biased = make_config(
        "celltype", "tiny_cnn", crop_size=32, outputs=["BLA", "LYT"], logit_bias={"BLA": 50.0}
    )
    path = save_model(model, biased, tmp_path / "m")
    after = load_model(path).module.predict_proba(crops)
    assert (after[:, 0] > 0.99).all() and not torch.allclose(before, after)


def test_stain_normalisation_undoes_a_scanner_colour_cast():
    from marrowscope.models.celltype import stain_normalise

    g = torch.Generator().manual_seed(0)
    cell = torch.rand(2, 3, 24, 24, generator=g) * 0.5 + 0.2
    cell[:, :, :, :8] = 0.9  # glass on a third of the image
    cast = cell * torch.tensor([0.95, 0.85, 0.75]).view(1, 3, 1, 1)  # a yellowish scanner
    assert stain_normalise(cell, "none") is cell
    for mode in ("background", "instance"):
        a, b = stain_normalise(cell, mode), stain_normalise(cast, mode)
        assert a.shape == cell.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # the cast is gone
    torch.testing.assert_close(  # background: the glass becomes white
        stain_normalise(cast, "background")[:, :, :, :8], torch.ones(2, 3, 24, 8)
    )
    with pytest.raises(InvalidInput, match="stain_norm"):
        stain_normalise(cell, "macenko")
    model = build_model(
        make_config("celltype", "cellnet", crop_size=32, stain_norm="background")
    ).eval()
    with torch.inference_mode():  # the model normalises: the same cell under both scanners
        torch.testing.assert_close(model(cell), model(cast), atol=1e-4, rtol=0)


@pytest.mark.parametrize("stain_norm", ["none", "background", "instance"])
def test_the_predictor_runs_the_model_s_own_input_path(tmp_path, stain_norm):
    """Serving and validation (`CellTyper`) see exactly what the model's forward sees,
    stain normalisation included: a merge once left it out of the predictor, so a model
    trained with `stain_norm` was validated and served on unnormalised colours."""
    import numpy as np

    from marrowscope.inference import CellTyper

    config = make_config(
        "celltype", "cellnet", crop_size=32, outputs=["BLA", "LYT"], stain_norm=stain_norm
    )
    model = build_model(config).eval()
    typer = CellTyper(load_model(save_model(model, config, tmp_path / "m")))
    crops = np.random.default_rng(0).integers(40, 256, (5, 32, 32, 3), dtype=np.uint8)
    crops[:, :, :10] = (250, 230, 200)  # a yellowish glass: background scaling is not 1
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        expected = model.probabilities(model(x)).numpy()
    probs, embeds = typer.predict_with_embeddings(crops)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(typer.predict(crops), expected, atol=1e-5)
    assert embeds.shape == (5, model.head.in_features)


def test_ensemble_standardisation_travels_with_weights(saved_ensemble):
    path, module = saved_ensemble
    loaded = load_model(path).module
    torch.testing.assert_close(loaded.feature_mean, module.feature_mean)
    assert loaded.feature_mean.abs().sum() > 0
    x = torch.randn(2, len(FEATURES))
    p = loaded.predict_proba(x, names=FEATURES)
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    with pytest.raises(InvalidInput, match="feature names differ"):
        loaded.predict_proba(x, names=list(reversed(FEATURES)))
    with pytest.raises(InvalidInput, match="NaN"):
        loaded.predict_proba(torch.full((1, len(FEATURES)), float("nan")))


def test_ensemble_feature_units_round_trip(tmp_path):
    from marrowscope.models import feature_units, read_config, units_from_pixel_sizes

    units = units_from_pixel_sizes([0.3, 0.25, 0.3])
    assert units == {"length": "um", "um_per_px": [0.25, 0.3]}
    config = make_config("ensemble", "mlp", feature_names=FEATURES, hidden=[4], feature_units=units)
    path = save_model(build_model(config), config, tmp_path / "um")
    assert json.loads((path / "config.json").read_text())["feature_units"] == units
    assert feature_units(load_model(path).config) == units
    px = make_config(
        "ensemble", "mlp", feature_names=FEATURES, feature_units=units_from_pixel_sizes([None])
    )
    assert feature_units(read_config(save_model(build_model(px), px, tmp_path / "px"))) == {
        "length": "px",
        "um_per_px": None,
    }
    # a config made without units says so explicitly
    assert (
        make_config("ensemble", "mlp", feature_names=FEATURES)["feature_units"]["length"]
        == "unknown"
    )


def test_ensemble_config_without_feature_units_still_loads(saved_ensemble, caplog):
    """Configs written before `feature_units` existed load as unknown, with a warning."""
    from marrowscope.models import feature_units

    path, module = saved_ensemble
    config = json.loads((path / "config.json").read_text())
    del config["feature_units"]
    (path / "config.json").write_text(json.dumps(config))
    loaded = load_model(path)
    assert "feature_units" not in loaded.config
    torch.testing.assert_close(loaded.module.feature_mean, module.feature_mean)
    with caplog.at_level("WARNING", logger="marrowscope.models.config"):
        assert feature_units(loaded.config) == {"length": "unknown", "um_per_px": None}
    assert "no feature_units" in caplog.text


@pytest.mark.parametrize(
    ("units", "message"),
    [
        ({"length": "mm", "um_per_px": None}, "length must be one of"),
        ({"length": "px", "um_per_px": [0.3, 0.3]}, "must be null"),
        ({"length": "um", "um_per_px": None}, r"\[min, max\]"),
        ({"length": "um", "um_per_px": [0.4, 0.3]}, r"\[min, max\]"),
        ({"length": "um"}, "feature_units must be"),
    ],
)
def test_bad_feature_units_are_rejected(units, message):
    with pytest.raises(ModelConfigError, match=message):
        make_config("ensemble", "mlp", feature_names=FEATURES, feature_units=units)


def test_mixed_pixel_sizes_have_no_units():
    from marrowscope.models import units_from_pixel_sizes

    with pytest.raises(ModelConfigError, match="1 of 2 images have no pixel size"):
        units_from_pixel_sizes([0.3, None])
    with pytest.raises(ModelConfigError, match="no images"):
        units_from_pixel_sizes([])


def test_npm1_refuses_wrong_input_size():
    model = build_model(tiny_config("npm1", "resnet18")).eval()
    ok = model.predict_proba(torch.randint(0, 256, (1, 64, 80, 3), dtype=torch.uint8))
    assert ok.shape == (1,)
    with pytest.raises(InvalidInput, match="input size"):
        model.predict_proba(torch.randint(0, 256, (1, 80, 64, 3), dtype=torch.uint8))


def test_local_pretrained_backbone_weights(tmp_path):
    import torchvision

    from marrowscope.models.weights import load_initial_weights

    imagenet_like = torchvision.models.resnet18(weights=None, num_classes=1000)
    torch.save(imagenet_like.state_dict(), tmp_path / "resnet18.pth")
    config = tiny_config("npm1", "resnet18")
    model = build_model(config)
    n = load_initial_weights(model, config, tmp_path / "resnet18.pth", scope="backbone")
    assert n == len(imagenet_like.state_dict()) - 2  # fc.weight/fc.bias differ in shape
    torch.testing.assert_close(model.net.conv1.weight, imagenet_like.conv1.weight)
    with pytest.raises(ModelFormatError, match="no tensor"):
        load_initial_weights(
            build_model(tiny_config("celltype", "tiny_cnn")),
            tiny_config("celltype", "tiny_cnn"),
            tmp_path / "resnet18.pth",
        )


def test_two_target_ensemble_round_trips_and_keeps_the_aml_api(tmp_path):
    """targets ["aml", "npm1"]: one hidden stack, two outputs; predict_proba stays P(AML)."""
    config = make_config(
        "ensemble", "mlp", feature_names=FEATURES, hidden=[6], targets=["aml", "npm1"]
    )
    module = build_model(config).eval()
    module.fit_standardisation(torch.randn(5, len(FEATURES)).numpy())
    loaded = load_model(save_model(module, config, tmp_path / "two")).module.eval()
    x = torch.randn(3, len(FEATURES))
    assert loaded(x).shape == (3, 2)
    out = loaded.predict_targets(x, names=FEATURES)
    assert list(out) == ["aml", "npm1"] and all(p.shape == (3,) for p in out.values())
    assert not torch.allclose(out["aml"], out["npm1"])
    torch.testing.assert_close(loaded.predict_proba(x, names=FEATURES), out["aml"])
    torch.testing.assert_close(out["npm1"], torch.sigmoid(loaded(x)[:, 1]))


def test_ensemble_config_without_targets_is_aml_only(saved_ensemble):
    from marrowscope.models.config import ensemble_targets

    path, _ = saved_ensemble
    config = json.loads((path / "config.json").read_text())
    config.pop("targets", None)
    (path / "config.json").write_text(json.dumps(config))
    loaded = load_model(path)
    assert ensemble_targets(loaded.config) == ["aml"] and loaded.module(
        torch.randn(2, len(FEATURES))
    ).shape == (2,)
    assert list(loaded.module.predict_targets(torch.randn(2, len(FEATURES)))) == ["aml"]


@pytest.mark.parametrize("targets", [["npm1"], ["aml", "aml"], ["aml", "flt3"], []])
def test_bad_ensemble_targets_are_rejected(targets):
    with pytest.raises(ModelConfigError, match="targets must start with 'aml'"):
        make_config("ensemble", "mlp", feature_names=FEATURES, targets=targets)
