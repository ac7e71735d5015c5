"""Frozen, typed configuration dataclasses that round-trip to TOML and JSON.

A :class:`Config` has one section per concern (``model``, ``data``, ``objective``, ``train``)
plus a run ``name`` and a global ``seed``. Sections are frozen dataclasses; change them with
:func:`override` and dotted ``key=value`` strings (``train.lr=3e-4``), which are type-checked:
an unknown key lists the valid ones and a value of the wrong type says what was expected.

Named presets are TOML files shipped in ``vaelab/presets``; :func:`load_preset` reads one and
:func:`preset_names` lists them. Facts derived from the data (image shape, value range) are never
written back into a config: they are passed to :func:`vaelab.model.build_model` as arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w


@dataclass(frozen=True)
class ModelConfig:
    """The network and likelihood.

    ``hidden`` means layer widths for ``mlp`` (encoder order; the decoder mirrors it) and
    channel counts per resolution for the convolutional families (``conv``, ``dcgan``, ``resnet``).
    An empty tuple takes the architecture's own default (mlp: 400; conv: 32, 64, 32; dcgan:
    32, 64, 128, 256; resnet: 64, 128). ``dropout`` 0 means the architecture's default (0 for
    mlp, 0.25 for conv). ``batch_norm`` applies to ``dcgan`` only (the other architectures
    have no batch normalisation, so they are the same function in train and eval mode).
    ``init`` is how the ``mlp`` architecture starts: ``"he"`` (the default) gives every Linear
    layer followed by a ReLU He (Kaiming) normal weights for its fan-in and zero biases, and
    starts the encoder's log-variances at -3 (posterior standard deviations 0.22), which
    reaches a given ELBO in fewer steps (docs/benchmarks.md); ``"torch"`` keeps PyTorch's
    default initialisation of every layer (what runs made before 2026-12-05 used). The other
    architectures keep their own initialisation either way.
    """

    arch: str = "mlp"
    latent_dim: int = 20
    hidden: tuple[int, ...] = ()
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = True
    likelihood: str = "bernoulli"
    sigma: float = 1.0
    sigma_floor: float = 1e-3
    gaussian_link: str = "sigmoid"
    blocks_per_stage: int = 1
    init: str = "he"


@dataclass(frozen=True)
class DataConfig:
    """Which dataset and which part of it (see :func:`vaelab.data.load_dataset`)."""

    name: str = "digits"
    data_dir: str | None = None
    valid_size: int | None = None
    subset_train: int | None = None
    subset_valid: int | None = None
    subset_test: int | None = None
    subset_mode: str = "first"
    binarize: str | None = None
    image_size: tuple[int, ...] | None = None
    channels: int | None = None


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training objective (see :mod:`vaelab.objectives`).

    ``name`` is ``elbo`` (``n_samples`` Monte Carlo samples, ``beta``, capacity, free bits) or
    ``iwae`` (``k`` importance samples). ``warmup`` anneals beta from 0 to ``beta`` over
    ``warmup_steps`` (``linear``) or in ``cycles`` cycles (``cyclical``, Fu et al. 2019).
    ``capacity`` > 0 switches to Burgess et al.'s ``gamma * |KL - C|`` with C rising linearly
    to ``capacity`` nats over ``capacity_steps``.
    """

    name: str = "elbo"
    n_samples: int = 1
    k: int = 1
    beta: float = 1.0
    capacity: float = 0.0
    capacity_gamma: float = 1000.0
    capacity_steps: int = 0
    free_bits: float = 0.0
    warmup: str = "none"
    warmup_steps: int = 0
    cycles: int = 4
    cycle_ratio: float = 0.5


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the training loop (see :func:`vaelab.train.fit`).

    ``threads`` > 0 sets torch's intra-op threads during the run (0 keeps torch's default);
    ``tensorboard`` also logs to ``RUN/tensorboard`` when the package is installed.
    ``fused`` lets MLP VAEs with a Bernoulli ELBO use the hand-written gradient of
    :mod:`vaelab.fused_elbo` (same numbers, fewer operations); ``compile`` turns it off.
    ``init_output_bias`` starts a new run with the decoder's output bias set so that p(x|z)
    has the training images' mean (:func:`vaelab.model.init_output_bias`; Bernoulli and
    Gaussian likelihoods with fixed or per-channel sigma); ``init_input_bias`` centres an MLP
    encoder's first layer on the training mean (:func:`vaelab.model.init_input_bias`).
    ``channels_last`` trains convolutional networks with their weights and images in the
    channels-last memory layout (NHWC), which oneDNN on CPUs and cuDNN on GPUs run faster (no
    effect on MLPs; the released model is converted back). ``bf16 = true`` runs the
    networks' products in bfloat16 with float32 weights, optimizer, latents and likelihood
    (autocast, with the decoder's output layer in float32 so that the likelihood's parameters
    keep float32 precision; on the fused MLP path, its own bf16 products on rounded copies of
    the weights): on CUDA, and on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX);
    elsewhere it warns and trains in float32.
    ``"auto"`` (the default) takes bf16 only where it was measured to pay without changing the
    result -- on a CPU with native bf16, the fused MLP path (2x the products' speed, the same
    test ELBO) and convolutional networks (up to 1.6x faster steps, test ELBO within the spread of
    float32 runs; docs/benchmarks.md) -- and float32 everywhere else; ``false`` is float32.
    ``compile_mode`` is torch.compile's mode for ``compile``: ``"reduce-overhead"`` replays the
    compiled step as CUDA graphs on a GPU (small networks, where launches dominate).
    ``sharded = true`` trains a one-hidden-layer MLP VAE on the fused bf16 path as two
    processes (this one and a worker), each pinned to a CPU core and owning half of every
    layer (:mod:`vaelab.sharded`); where it does not apply it warns and trains as usual.
    """

    epochs: int = 10
    max_steps: int = 0
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: str = "none"
    grad_clip: float = 0.0
    early_stopping: int = 0
    device: str = "auto"
    bf16: bool | Literal["auto"] = "auto"
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"
    fused: bool = True
    sharded: bool = False
    init_output_bias: bool = True
    init_input_bias: bool = True
    log_every: int = 50
    checkpoint_every: int = 0
    max_bad_steps: int = 0
    figures: bool = True
    report: bool = True
    tensorboard: bool = False
    threads: int = 0


@dataclass(frozen=True)
class Config:
    """A whole experiment: everything needed to rebuild a run."""

    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# dict round trip with type checking


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list ({_type_name(tp)}), got {value!r}")
        (elem, *rest) = typing.get_args(tp)
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a table of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{where}: expected a string, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise TypeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    if origin is Literal:
        return " or ".join(f'"{a}"' for a in typing.get_args(tp))
    if tp is bool:
        return "true/false"
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict; unknown keys raise and list the valid ones."""
    hints = _hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        section = where or cls.__name__
        raise ValueError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {section}; "
            f"valid keys: {', '.join(valid)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-serialisable dict (tuples become lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def dumps(cfg: Config, fmt: str = "toml") -> str:
    """Serialise to ``toml`` (``None`` values are omitted: they are the defaults) or ``json``."""
    if fmt == "json":
        return json.dumps(to_dict(cfg), indent=2)
    if fmt == "toml":
        return tomli_w.dumps(_drop_none(to_dict(cfg)))
    raise ValueError(f"unknown config format {fmt!r}; use 'toml' or 'json'")


def loads(text: str, fmt: str = "toml") -> Config:
    """Parse a TOML or JSON config; missing keys take their defaults."""
    data = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    return from_dict(Config, data)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write ``cfg`` atomically as TOML or JSON, chosen by the file suffix."""
    from vaelab.io import atomic_write_text

    path = Path(path)
    fmt = "json" if path.suffix == ".json" else "toml"
    atomic_write_text(path, dumps(cfg, fmt))
    return path


def load_config(path: str | os.PathLike) -> Config:
    """Read a config file (``.toml`` or ``.json``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    fmt = "json" if path.suffix == ".json" else "toml"
    try:
        return loads(path.read_text(), fmt)
    except (ValueError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# dotted overrides


def _parse_value(text: str, tp: Any) -> Any:
    """Parse a command-line string for a field of type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType) and type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse_value(text, inner)
    if origin in (Union, types.UnionType):  # e.g. bool | Literal["auto"]: the first that parses
        for arg in args:
            try:
                return _parse_value(text, arg)
            except TypeError:
                continue
        raise TypeError(f"expected {_type_name(tp)}, got {text!r}")
    if origin is Literal:
        if text in args:
            return text
        raise TypeError(f"expected {_type_name(tp)}, got {text!r}")
    if origin is tuple:
        parts = [p for p in text.strip("()[]").split(",") if p.strip()]
        return [_parse_value(p.strip(), args[0]) for p in parts]
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise TypeError(f"expected true/false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                raise TypeError(f"expected an integer, got {text!r}") from None
            if not f.is_integer():
                raise TypeError(f"expected an integer, got {text!r}") from None
            return int(f)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise TypeError(f"expected a number, got {text!r}") from None
    return text


def override(cfg: Config, assignments: list[str] | tuple[str, ...]) -> Config:
    """Return a copy of ``cfg`` with dotted ``key=value`` assignments applied.

    >>> override(Config(), ["train.lr=3e-4", "model.hidden=512,512"]).train.lr
    0.0003
    """
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        cfg = _set_path(cfg, path, text.strip(), key)
    return cfg


def _set_path(obj: Any, path: list[str], text: str, full_key: str) -> Any:
    names = [f.name for f in fields(obj)]
    head = path[0]
    if head not in names:
        parts = full_key.strip().split(".")
        consumed = parts[: len(parts) - len(path)]  # the sections already walked through
        prefix = ".".join(consumed) + "." if consumed else ""
        raise ValueError(
            f"unknown config key {full_key!r}; valid keys here: "
            + ", ".join(prefix + n for n in names)
        )
    tp = _hints(type(obj))[head]
    if len(path) == 1:
        if _is_dataclass_type(tp):
            raise ValueError(
                f"{full_key!r} is a section; set one of its keys: "
                + ", ".join(f"{full_key}.{f.name}" for f in fields(tp))
            )
        try:
            value = _coerce(_parse_value(text, tp), tp, full_key)
        except TypeError as exc:
            raise ValueError(f"bad value for {full_key}: {exc}") from None
        return replace(obj, **{head: value})
    if not _is_dataclass_type(tp):
        raise ValueError(f"{'.'.join(path[:1])!r} in {full_key!r} is not a section")
    return replace(obj, **{head: _set_path(getattr(obj, head), path[1:], text, full_key)})


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts (for help texts and error messages)."""
    out = []
    for f in fields(cls):
        tp = _hints(cls)[f.name]
        if _is_dataclass_type(tp):
            out += valid_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


# ---------------------------------------------------------------------------------------------
# presets


def preset_names() -> list[str]:
    """Names of the presets shipped with vaelab."""
    root = resources.files("vaelab") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    root = resources.files("vaelab") / "presets"
    path = root / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return path.read_text()


def load_preset(name: str) -> Config:
    """The named preset as a :class:`Config`."""
    try:
        return loads(preset_text(name))
    except (TypeError, ValueError) as exc:
        if "unknown preset" in str(exc):
            raise
        raise ValueError(f"preset {name!r}: {exc}") from exc


def preset_description(name: str) -> str:
    """The first comment line of a preset file."""
    for line in preset_text(name).splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
