"""The scripts' shared command-line helpers (``vidaccel.pipelines.cli``): ``--methods`` and
``--timesteps`` parsing and the rolling window's defaults."""

import argparse

import pytest

from vidaccel.pipelines.cli import parse_methods, parse_timesteps, rollout_window


def test_parse_methods_combinations():
    known, combinable = ("dense", "a", "b"), ("a", "b")
    parsed = parse_methods(" dense, a + b ,b", known, combinable=combinable)
    assert parsed == ["dense", "a+b", "b"]
    for spec in ("dense+a", "a+a", "a,c", " , "):
        with pytest.raises(ValueError, match="--methods"):
            parse_methods(spec, known, combinable=combinable)
    with pytest.raises(ValueError, match="'a\\+b' is not"):
        parse_methods("a+b", known)  # no combinations unless allowed


def test_rolling_window_defaults_to_the_models_recommendation():
    """``--window-frames``/``--sink-frames`` left unset take the model's ``recommended_rollout``
    (else 21 and 3); given ones stay."""
    recommended = {"recommended_rollout": {"max_cache_frames": 8, "sink_frames": 4}}
    for given, metadata, expected in (
        ((None, None), recommended, (8, 4)),
        ((None, None), {}, (21, 3)),
        ((12, None), recommended, (12, 4)),
        ((30, 2), recommended, (30, 2)),
    ):
        args = argparse.Namespace(window_frames=given[0], sink_frames=given[1])
        rollout_window(args, metadata)
        assert (args.window_frames, args.sink_frames) == expected


def test_parse_timesteps():
    assert parse_timesteps("1000, 750,500,250,150") == [1000.0, 750.0, 500.0, 250.0, 150.0]
    for text in ("1000,1000", "500,750", "1000,0", "1200,500", "1000,x", ""):
        with pytest.raises(ValueError, match="timesteps"):
            parse_timesteps(text)
