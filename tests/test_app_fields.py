"""The app's fields (``vidaccel.pipelines.app.fields``): the method panels follow the config
dataclasses, and every default round-trips through the page into a config."""

from __future__ import annotations

import dataclasses

import pytest

import vidaccel
from vidaccel.pipelines.app.fields import METHODS, T2V, WORLD, default_values, method_configs, method_fields


def test_method_fields_follow_the_configs():
    for spec in METHODS:
        if spec.config is None:
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(spec.config)}
        fields = method_fields(spec)
        assert fields[0].key == f"{spec.name}.enabled" and fields[0].default is False
        for f in fields[1:]:
            name = f.key.split(".", 1)[1]
            expected = spec.app_defaults.get(name, defaults[name])
            shown = f.default if f.kind != "pair" else tuple(int(v) for v in f.default.split(","))
            assert shown == expected, f.key
    values = default_values(**{f"{spec.name}.enabled": True for spec in METHODS if spec.config})
    world = {type(c).__name__ for c in method_configs(values, WORLD)}
    assert world == {"TempCacheConfig", "AnnSAConfig", "AnnCAConfig", "FlashBlockConfig"}  # no FreeSwim
    t2v = method_configs(values, T2V)
    assert {type(c).__name__ for c in t2v} == {"AnnSAConfig", "AnnCAConfig", "FreeSwimConfig"}
    freeswim = next(c for c in t2v if isinstance(c, vidaccel.FreeSwimConfig))
    assert freeswim == vidaccel.FreeSwimConfig()  # every shown default round-trips through the page


def test_default_values_refuse_an_unknown_field():
    with pytest.raises(KeyError, match="unknown field"):
        default_values(**{"TempCache.threshhold": 0.5})
