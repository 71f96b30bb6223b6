import pytest

from vsraq_plugin import ConfigError, QuantConfig


def test_round_trip_preserves_every_field():
    cfg = QuantConfig(
        bits=3,
        group_size=64,
        sym=False,
        desc_act=True,
        method="agq",
        lambda_metric=2.5,
        dynamic={r"experts\.3\.": {"bits": 4}},
    )
    again = QuantConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"bits": 5}, "bits"),
        ({"bits": True}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -2}, "group_size"),
        ({"method": "awq"}, "method"),
        ({"damp_percent": 0.0}, "damp_percent"),
        ({"damp_percent": float("nan")}, "damp_percent"),
        ({"lambda_value": -1.0}, "lambda_value"),
        ({"router_mode": "train"}, "router_mode"),
        ({"fp_target_alpha": 1.5}, "fp_target_alpha"),
        ({"lambda_metric_qk": -1.0}, "lambda_metric_qk"),
        ({"probe_tokens": 0}, "probe_tokens"),
        ({"probe_directions": 2.0}, "probe_directions"),
        ({"dynamic": {"x": {"bits": 6}}}, "dynamic"),
        ({"expert_chunk": -1}, "expert_chunk"),
        ({"expert_chunk": 2.5}, "expert_chunk"),
        ({"damage_metric": "fisher"}, "damage_metric"),
        ({"width_per_projection": True}, "width_per_projection"),  # no bits_budget
        ({"width_per_projection": 1, "bits_budget": 3.0, "bit_levels": [2, 4]}, "width_per_projection"),
        (
            {"width_per_projection": True, "bits_budget": 3.0, "bit_levels": [2, 4], "allocation": "random"},
            "width_per_projection",
        ),
    ],
)
def test_bad_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**changes)


def test_unknown_key_lists_known_fields():
    with pytest.raises(ConfigError, match=r"unknown QuantConfig field.*wbits"):
        QuantConfig.from_dict({"wbits": 4})


def test_group_size_must_divide_in_features():
    cfg = QuantConfig(group_size=128)
    cfg.check_in_features(256)
    with pytest.raises(ConfigError, match=r"does not divide .*input dimension 96.*group_size in \[32\]"):
        cfg.check_in_features(96, "model.layers.0.mlp.down_proj")


def test_the_clipping_search_defaults_to_vsraq_only_and_refuses_a_bad_norm():
    """``mse=None`` resolves per method (vsraq 2.4, the stock methods the full range), an explicit value wins, and
    a value that is no norm is refused with the fix."""
    assert QuantConfig(method="vsraq").mse_norm == 2.4
    assert all(QuantConfig(method=m).mse_norm == 0.0 for m in ("rtn", "gptq", "agq"))
    assert QuantConfig(method="vsraq", mse=0).mse_norm == 0.0 and QuantConfig(method="gptq", mse=2).mse_norm == 2.0
    for bad in (0.5, -1.0, True, "2.4", 17.0):
        with pytest.raises(ConfigError, match=r"mse=.* must be 0 \(the full range\)"):
            QuantConfig(mse=bad)
