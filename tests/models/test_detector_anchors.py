"""Detector anchor / RPN settings in the model config: build, save, load, old configs unchanged."""

from __future__ import annotations

import pytest
import torch

from marrowscope.models import ModelConfigError, build_model, load_model, make_config, save_model

ARCH = "fasterrcnn_mobilenet_v3_large_fpn"
CUSTOM = {
    "anchor_sizes": [[16, 32, 64]] * 3,
    "anchor_aspect_ratios": [1.0],
    "hyperparameters": {
        "rpn_pre_nms_top_n_test": 50,
        "rpn_post_nms_top_n_test": 20,
        "rpn_pre_nms_top_n_train": 60,
        "rpn_post_nms_top_n_train": 30,
        "box_batch_size_per_image": 16,
        "rpn_batch_size_per_image": 32,
    },
}


def _config(**extra) -> dict:
    return make_config("detector", ARCH, classes=["cell", "RBC"], min_size=64, max_size=96, **extra)


def _outputs(module: torch.nn.Module) -> list[torch.Tensor]:
    module.eval()
    x = [torch.rand(3, 72, 88, generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode():
        y = module(x)[0]
    return [y["boxes"], y["scores"], y["labels"].float()]


def test_custom_anchors_build_save_load_identical(tmp_path):
    torch.manual_seed(0)
    config = _config(**CUSTOM)
    model = build_model(config)
    gen = model.rpn.anchor_generator
    assert gen.sizes == ((16, 32, 64),) * 3
    assert gen.aspect_ratios == ((1.0,),) * 3
    assert model.rpn.head.cls_logits.out_channels == 3  # 3 sizes x 1 ratio per location
    assert model.rpn._post_nms_top_n == {"training": 30, "testing": 20}
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 16
    loaded = load_model(save_model(model, config, tmp_path / "m"))
    assert loaded.config["anchor_sizes"] == CUSTOM["anchor_sizes"]
    assert loaded.module.rpn.anchor_generator.sizes == gen.sizes
    for a, b in zip(_outputs(model), _outputs(loaded.module), strict=True):
        assert torch.equal(a, b)


def test_config_without_new_keys_builds_the_default_model():
    old = _config()
    for key in ("anchor_sizes", "anchor_aspect_ratios"):
        del old[key]  # a config.json written before these keys existed
    torch.manual_seed(0)
    a = build_model(old)
    torch.manual_seed(0)
    b = build_model(_config())  # new keys present but null
    assert a.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),) * 3
    assert a.rpn.head.cls_logits.out_channels == 15
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"anchor_sizes": [[16, 32]]}, "3 lists"),
        ({"anchor_sizes": [[16, 32], [32], [64, 128]]}, "equal length"),
        ({"anchor_sizes": [[16, 0], [32, 64], [64, 128]]}, "positive integer"),
        ({"anchor_aspect_ratios": [1.0, -2]}, "positive numbers"),
        ({"hyperparameters": {"rpn_post_nms_top_n_train": 0}}, "positive integer"),
    ],
)
def test_bad_anchor_settings_are_refused(extra, message):
    with pytest.raises(ModelConfigError, match=message):
        _config(**extra)
