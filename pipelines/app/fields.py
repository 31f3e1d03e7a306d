"""The app's fields: every value the page sends, by key, and how a value becomes a config.

The methods as the page offers them (:data:`METHODS`), the fields outside the method panels
(:data:`GENERAL_FIELDS`), the field values of a page (:func:`default_values`) and their parsing and
checks (:func:`method_configs`, :func:`int_value`, :func:`world_actions`): a bad value raises a
``ValueError`` that names the field, which :func:`error_text` turns into the page's message.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

import vidaccel
from vidaccel.config import MethodConfig
from vidaccel.pipelines.game import parse_actions

WORLD, WORLD_RANDOM, T2V, CAUSAL = "world", "world_random", "t2v", "causal"
SOURCES = {
    WORLD: "World model (shipped weights)",
    WORLD_RANDOM: "World model (random weights, for testing)",
    T2V: "Wan checkpoint: text-to-video (WanPipeline)",
    CAUSAL: "Wan checkpoint: autoregressive (CausalWanPipeline)",
}
"""Model sources: key -> the label shown in the page (the value of the ``model`` field)."""
WORLD_KINDS = frozenset({WORLD, WORLD_RANDOM})
ROLLOUT_KINDS = WORLD_KINDS | {CAUSAL}


@dataclass(frozen=True)
class MethodSpec:
    """One method as the page offers it.

    Attributes:
        name: shown name and prefix of its field keys (``"TempCache.threshold"``).
        config: its config dataclass, or ``None`` when this vidaccel build lacks it.
        kinds: the model sources it applies to.
        fields: the config fields shown, in order (``None``: every field of a simple type).
        choices: allowed values of string fields (shown as drop-downs).
        app_defaults: values shown where the config's own default cannot run as is (AnnSA and AnnCA
            need exactly one of ``top_p``/``top_k``; their configs default both to ``None``).
        note: one line on what it does.
    """

    name: str
    config: type[MethodConfig] | None
    kinds: frozenset[str]
    fields: tuple[str, ...] | None
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    app_defaults: Mapping[str, object] = field(default_factory=dict)
    note: str = ""


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(
        "TempCache",
        vidaccel.TempCacheConfig,
        ROLLOUT_KINDS,
        ("threshold", "sink_frames", "max_tokens", "scope", "radius"),
        {"scope": vidaccel.TempCacheConfig.SCOPES},
        note="merges near-duplicate cached keys across frames (KV cache of a rollout)",
    ),
    MethodSpec(
        "AnnSA",
        vidaccel.AnnSAConfig,
        ROLLOUT_KINDS | {T2V},
        ("n_clusters", "top_p", "top_k", "refresh_every", "dense_layers", "dense_steps"),
        app_defaults={"top_p": 0.9},
        note="ANN-routed block-sparse self-attention (set top_p or top_k, not both)",
    ),
    MethodSpec(
        "AnnCA",
        vidaccel.AnnCAConfig,
        ROLLOUT_KINDS | {T2V},
        ("top_p", "top_k", "granularity", "refresh_every"),
        {"granularity": ("frame", "block")},
        app_defaults={"top_p": 0.9},
        note="ANN-selected sparse cross-attention to the prompt (set top_p or top_k, not both)",
    ),
    MethodSpec(
        "FlashBlock",
        vidaccel.FlashBlockConfig,
        ROLLOUT_KINDS,
        None,
        note="reuses the attention to earlier chunks across a chunk's denoising steps",
    ),
    MethodSpec(
        "FreeSwim",
        vidaccel.FreeSwimConfig,
        frozenset({T2V}),
        ("train_size", "cache_steps", "temperature", "offload_cache"),
        note="inward sliding windows above the training size (height/width >= train_size)",
    ),
)


@dataclass(frozen=True)
class Field:
    """A page field: ``kind`` is ``int``, ``float``, ``bool``, ``choice``, ``pair`` or ``text``;
    ``optional``: a number that may be left empty (``None``), shown as a text box."""

    key: str
    label: str
    kind: str
    default: object
    choices: tuple = ()
    info: str = ""
    optional: bool = False


GENERAL_FIELDS: tuple[Field, ...] = (
    Field("model", "Model", "choice", SOURCES[WORLD], tuple(SOURCES.values())),
    Field("checkpoint", "Checkpoint folder (diffusers format)", "text", "",
          info="a local folder with model_index.json, for the two 'Wan checkpoint' models"),
    Field("seed", "Seed", "int", 0),
    Field("frames", "Frames", "int", 32 if torch.cuda.is_available() else 4,
          info="world model: frames predicted after the context; checkpoints: output frames (4k+1)"),
    Field("actions", "Actions", "text", "scripted",
          info="world model: 'scripted', 'random', or names/ids like 'right,right,up' (repeated to length)"),
    Field("level", "Level", "int", 0, info="world model: the game's palette, 0..3"),
    Field("prompt", "Prompt", "text", "A red panda walks through a bamboo forest, cinematic"),
    Field("height", "Height", "int", 480),
    Field("width", "Width", "int", 832),
    Field("steps", "Denoising steps", "int", 20, info="text-to-video (rollouts use the model's few-step schedule)"),
    Field("guidance", "Guidance scale", "float", 5.0, info="text-to-video"),
    Field("warmup", "Warm up first (compiles kernels; fairer timings)", "bool", torch.cuda.is_available()),
    Field("play_frames", "Play: frames per session", "int", 192),
)  # fmt: skip
"""The fields outside the method panels (their keys are those of :func:`default_values`)."""
GENERATION_FIELDS = ("seed", "frames", "actions", "level", "prompt", "height", "width", "steps", "guidance")
WORLD_ONLY = ("actions", "level")
CHECKPOINT_ONLY = ("checkpoint", "prompt", "height", "width")
T2V_ONLY = ("steps", "guidance")


def general_field(key: str) -> Field:
    """The field of :data:`GENERAL_FIELDS` with this key (``StopIteration`` for another key)."""
    return next(f for f in GENERAL_FIELDS if f.key == key)


def method_fields(spec: MethodSpec) -> list[Field]:
    """The page fields of one method: ``<name>.enabled`` and its parameters, defaults from the config
    dataclass (or :attr:`MethodSpec.app_defaults`). Empty when the method is not available."""
    if spec.config is None:
        return []
    hints = typing.get_type_hints(spec.config)
    defaults = {f.name: f.default for f in dataclasses.fields(spec.config)}
    names = spec.fields if spec.fields is not None else list(defaults)
    result = [Field(f"{spec.name}.enabled", spec.name, "bool", False, info=spec.note)]
    for name in names:
        kind = _kind_of(hints[name], name in spec.choices)
        if kind is None:
            continue
        default = spec.app_defaults.get(name, defaults[name])
        if kind == "pair" and default is not None:
            default = ", ".join(str(v) for v in default)
        optional = type(None) in typing.get_args(hints[name]) and kind in ("int", "float")
        choices = tuple(spec.choices.get(name, ()))
        result.append(Field(f"{spec.name}.{name}", name, kind, default, choices, optional=optional))
    return result


def all_fields() -> list[Field]:
    """Every field of the page, in the order the page sends them."""
    return [*GENERAL_FIELDS, *(f for spec in METHODS for f in method_fields(spec))]


def default_values(**overrides) -> dict:
    """``{field key: default}`` for every field, updated by ``overrides`` (keys with dots, such as
    ``"TempCache.enabled"``, are passed as a dict: ``default_values(**{"TempCache.enabled": True})``)."""
    values = {f.key: f.default for f in all_fields()}
    unknown = set(overrides) - set(values)
    if unknown:
        raise KeyError(f"unknown field(s) {sorted(unknown)}; known: {sorted(values)}")
    return {**values, **overrides}


def source_key(label_or_key: str) -> str:
    """The model source key of a ``model`` field value (its label, or the key itself)."""
    for key, label in SOURCES.items():
        if label_or_key in (key, label):
            return key
    raise ValueError(f"Model must be one of: {'; '.join(SOURCES.values())} (got {label_or_key!r})")


def method_configs(values: Mapping, kind: str) -> list[MethodConfig]:
    """The configs of the enabled methods that apply to ``kind``, from the field values. Raises
    ``ValueError`` naming the method and field for a bad value."""
    configs = []
    for spec in METHODS:
        if spec.config is None or not values.get(f"{spec.name}.enabled") or kind not in spec.kinds:
            continue
        kwargs = {}
        for f in method_fields(spec)[1:]:
            name = f.key.split(".", 1)[1]
            kwargs[name] = _parse(f, values.get(f.key, f.default), spec.name)
        try:
            configs.append(spec.config(**kwargs))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{spec.name}: {error}") from None
    return configs


def method_names(configs: list[MethodConfig]) -> str:
    """``"TempCache + AnnSA"``: the methods of ``configs`` as the page names them (empty: none)."""
    return " + ".join(type(c).__name__.removesuffix("Config") for c in configs)


def world_actions(spec, frames: int) -> str | list[int]:
    """The Actions field as ``vidaccel.pipelines.evaluation.rollout_actions`` takes it: ``"scripted"``,
    ``"random"``, or the ids of a comma-separated list of names/ids repeated to ``frames`` (never a
    path: the page does not read the server's files). Raises ``ValueError`` naming a bad action."""
    text = str(spec or "").strip()
    if text.lower() in ("", "scripted", "random"):
        return text.lower() or "scripted"
    try:
        ids = parse_actions([item for item in text.split(",") if item.strip()])
    except ValueError as error:
        raise ValueError(f"Actions: {error}") from None
    if not ids:
        raise ValueError("Actions: give 'scripted', 'random' or a comma-separated list of actions")
    return [ids[i % len(ids)] for i in range(frames)]


def int_value(values: Mapping, key: str, low: int, high: int) -> int:
    """The integer field ``key`` of ``values``, in ``[low, high]`` (``ValueError`` naming the field)."""
    label = _label(key)
    value = values.get(key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: expected an integer in [{low}, {high}], got {value!r}") from None
    if not number.is_integer() or not low <= number <= high:
        raise ValueError(f"{label}: expected an integer in [{low}, {high}], got {value!r}")
    return int(number)


def float_value(values: Mapping, key: str, low: float, high: float) -> float:
    """The number field ``key`` of ``values``, in ``[low, high]`` (``ValueError`` naming the field)."""
    value = values.get(key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not low <= number <= high:
        raise ValueError(f"{_label(key)}: expected a number in [{low}, {high}], got {value!r}")
    return number


def error_text(error, *, unexpected: bool = False) -> str:
    """The page's message for an error (or a text): ``**Cannot run**`` for a bad value, ``**Something
    went wrong**`` with the exception's type for an ``unexpected`` one."""
    text = str(error) if not isinstance(error, BaseException) else (str(error) or type(error).__name__)
    if unexpected:
        return f"**Something went wrong** ({type(error).__name__}): {text}"
    return f"**Cannot run**: {text}"


def _kind_of(hint, has_choices: bool) -> str | None:
    """The field kind of a config annotation (``X | None`` as ``X``); ``None``: not offered."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = set(typing.get_args(hint)) - {type(None)} if union else {hint}
    if args == {bool}:
        return "bool"
    if args == {str}:
        return "choice" if has_choices else "text"
    if args == {int}:
        return "int"
    if args <= {int, float}:
        return "float"
    if any(typing.get_origin(a) is tuple and typing.get_args(a) == (int, int) for a in args):
        return "pair"
    return None


def _parse(f: Field, value, method: str):
    """A method field's page value -> the config's value (``ValueError`` naming method and field)."""
    label = f"{method} {f.label}"
    if f.kind in ("int", "float"):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{label}: expected a number, got {value!r}") from None
        if f.kind == "int" and number.is_integer():
            return int(number)
        return number
    if f.kind == "pair":
        if value is None or not str(value).strip():
            return None
        parts = [p.strip() for p in str(value).strip("()[] ").split(",")]
        if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"{label}: expected two integers like '480, 832', got {value!r}")
        return tuple(int(p) for p in parts)
    if f.kind == "bool":
        return bool(value)
    return value


def _label(key: str) -> str:
    return next((f.label for f in GENERAL_FIELDS if f.key == key), key)
