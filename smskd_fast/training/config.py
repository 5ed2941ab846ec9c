"""Run configuration: YAML (or a dict) validated into typed dataclasses.

Errors name the offending key by its full path (e.g. "stages[1].optimizer.lr").
Two conveniences are expanded before validation: a `defaults:` mapping is merged
into every stage (errors say when a value came from it), and a stage may say
`method: kd` (or a mapping) instead of a `methods:` list. `--set key.path=value`
overrides (apply_overrides) act on the raw mapping, so they are validated like the file.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from smskd_fast.ops.schema import WEIGHTINGS

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "OptimizerConfig", "ScheduleConfig", "MethodConfig",
    "StageConfig", "CacheStoreConfig", "CacheConfig", "RunConfig", "load_config", "parse_config",
    "apply_overrides", "config_to_dict", "uses_reference", "WEIGHTINGS", "NONFINITE_POLICIES",
]

SCHEDULE_SCOPES = ("stage", "run")
NONFINITE_POLICIES = ("stop", "skip")  # what a stage does with a batch whose loss is NaN or inf
SEQUENCE_METHODS = ("none", "kd")  # the methods computed from logits alone, by the fused loss
SGD_MOMENTUM = 0.9  # optimizer.momentum's default; adam and adamw refuse any other value (they do not read it)
MULTISTEP_GAMMA = 0.1  # schedule.gamma's default; schedules other than multistep refuse any other value


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names its key (`key`, when known)."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


@dataclass
class DataConfig:
    name: str = "digits"
    root: Optional[str] = None
    batch_size: int = 64
    eval_batch_size: int = 256
    augment: str = "none"
    crop_padding: int = 4
    image_size: int = 224
    train_subset: Optional[int] = None  # the first N samples (ImageFolder: classes in turn); all when None or more
    test_subset: Optional[int] = None
    context_length: int = 64  # tokens per sequence (sequence data sets only)
    validation_fraction: float = 0.0  # share of the training data held out for choices (never the test split)


@dataclass
class ModelConfig:
    name: str
    checkpoint: Optional[str] = None


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = SGD_MOMENTUM
    weight_decay: float = 5e-4
    nesterov: bool = False


@dataclass
class ScheduleConfig:
    name: str = "multistep"
    milestones: List[int] = field(default_factory=list)
    gamma: float = MULTISTEP_GAMMA


@dataclass
class MethodConfig:
    name: str
    weight: Optional[float] = None
    student_layers: Optional[List[str]] = None
    teacher_layers: Optional[List[str]] = None
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class StageConfig:
    methods: List[MethodConfig]
    epochs: int
    name: Optional[str] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ce_weight: float = 1.0
    ref_weight: float = 1.0
    temperature: float = 4.0
    weighting: str = "inverse_tcp"
    reference: bool = True
    nonfinite: str = "stop"
    fused_linear: bool = False  # loss from hidden states with fused_linear_smskd_loss (language models)


@dataclass
class CacheStoreConfig:
    """One frozen model's logit cache (smskd_fast/training/logit_cache.py): where and in which form."""

    dir: Optional[str] = None
    format: str = "dense"
    dtype: str = "float16"
    k: int = 0
    shard_rows: int = 4096
    batch_size: int = 1024


@dataclass
class CacheConfig:
    """`cache: {teacher: ..., reference: ...}`: read these frozen models' logits from disk."""

    teacher: Optional[CacheStoreConfig] = None
    reference: Optional[CacheStoreConfig] = None


def uses_reference(stage: StageConfig, index: int) -> bool:
    """Whether stage `index` (0-based) has a reference: not the first stage, and not switched off."""
    return index > 0 and stage.reference and stage.ref_weight > 0


@dataclass
class RunConfig:
    student: ModelConfig
    stages: List[StageConfig]
    teacher: Optional[ModelConfig] = None
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    threads: Optional[int] = None
    progress: bool = True
    plots: bool = True
    teacher_training: Optional[StageConfig] = None
    cache: Optional[CacheConfig] = None
    schedule_scope: str = "stage"  # "stage": each stage restarts its LR schedule; "run": one schedule over all stages

    def stage_names(self) -> List[str]:
        return [stage.name or f"stage{index + 1}_{'+'.join(m.name for m in stage.methods)}"
                for index, stage in enumerate(self.stages)]


_EXPONENT_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")



def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))


def _build(kind: Any, value: Any, path: str) -> Any:
    """Converts value to type `kind`, recursively; raises ConfigError naming path."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _build(inner[0], value, path)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        hints = typing.get_type_hints(kind)
        known = {f.name: f for f in dataclasses.fields(kind)}
        unknown = [key for key in value if key not in known]
        if unknown:
            raise ConfigError(f"{path}.{unknown[0]}: unknown key; expected one of {sorted(known)}".lstrip("."))
        built = {}
        for name, spec in known.items():
            key_path = f"{path}.{name}" if path else name
            if name in value:
                built[name] = _build(hints[name], value[name], key_path)
            elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key_path}: required key is missing")
        return kind(**built)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_build(args[0], item, f"{path}[{index}]") for index, item in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; it is meant as a number
    if kind in (int, float, str, bool) and (type(value) is kind):
        return value
    raise ConfigError(f"{path}: expected {_type_name(kind)}, got {type(value).__name__} {value!r}")


METHOD_FORMS = ("method", "methods")  # `method: X` is short for `methods: [X]`


def _expand_stage(stage: Any, defaults: Dict[str, Any], path: str) -> Any:
    """The stage merged over the defaults (a stage's own method or methods replaces the defaults'
    in either form), with `method: X` rewritten as `methods: [X]`."""
    if not isinstance(stage, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(stage).__name__} {stage!r}")
    if "method" in stage and "methods" in stage:
        raise ConfigError(f"{path}: has both 'method' and 'methods'; give one ('method: X' is short for "
                          f"'methods: [X]')")
    base = copy.deepcopy(defaults)
    if any(form in stage for form in METHOD_FORMS):
        for form in METHOD_FORMS:
            base.pop(form, None)
    merged = _deep_merge(base, stage)
    if "method" in merged:
        merged["methods"] = [merged.pop("method")]
    if isinstance(merged.get("methods"), list):
        merged["methods"] = [{"name": m} if isinstance(m, str) else m for m in merged["methods"]]
    return merged


def _deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def _check(condition: bool, path: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{path}: {message}", key=path)


def _check_at_least(value: float, path: str, low: float, strict: bool = False) -> None:
    """value is finite and >= low (> low when strict); NaN and inf are refused."""
    _check(value > low if strict else value >= low, path, f"must be {'>' if strict else '>='} {low:g}, got {value}")
    _check(math.isfinite(value), path, f"must be finite, got {value}")


def _is_device(name: str) -> bool:
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def _validate(config: RunConfig) -> None:
    from smskd_fast.training.data import DATASETS

    _check(config.data.name in DATASETS, "data.name", f"must be one of {list(DATASETS)}, got {config.data.name!r}")
    for name in ("train_subset", "test_subset"):  # None: the whole split
        count = getattr(config.data, name)
        _check(count is None or count >= 1, f"data.{name}", f"must be a sample count >= 1 or null (all), got {count}")
    _check(config.data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {config.data.batch_size}")
    _check(config.data.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
    _check(config.data.augment in ("none", "crop", "crop_flip"), "data.augment",
           f"must be 'none', 'crop' or 'crop_flip', got {config.data.augment!r}")
    _check(0.0 <= config.data.validation_fraction < 1.0, "data.validation_fraction",
           f"must be in [0, 1), got {config.data.validation_fraction}")
    _check(config.data.crop_padding >= 0, "data.crop_padding", f"must be >= 0, got {config.data.crop_padding}")
    _check(config.data.image_size >= 1, "data.image_size", f"must be >= 1 pixel, got {config.data.image_size}")
    _check(_is_device(config.device), "device",
           f"expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {config.device!r}")
    _check(config.threads is None or config.threads >= 1, "threads", f"must be >= 1, got {config.threads}")
    _check(len(config.stages) >= 1, "stages", "needs at least one stage")
    _check(config.schedule_scope in SCHEDULE_SCOPES, "schedule_scope",
           f"must be one of {list(SCHEDULE_SCOPES)}, got {config.schedule_scope!r}")
    for index, stage in enumerate(config.stages):
        path = f"stages[{index}]"
        _validate_stage(stage, path)
        for method in stage.methods:
            if method.name != "none":
                _check(config.teacher is not None, "teacher", f"is required: {path} uses method {method.name!r}")
        if uses_reference(stage, index) and stage.weighting != "constant":
            _check(config.teacher is not None, "teacher",
                   f"is required: {path} weights its reference term by the teacher's TCP ({stage.weighting!r})")
    if config.teacher_training is not None:
        _validate_stage(config.teacher_training, "teacher_training")
        for m_index, method in enumerate(config.teacher_training.methods):
            _check(method.name == "none", f"teacher_training.methods[{m_index}].name",
                   f"must be 'none': the teacher trains alone, with cross-entropy; got {method.name!r}")
    if config.cache is not None:
        _validate_cache(config)
    names = config.stage_names()
    _check(len(set(names)) == len(names), "stages", f"stage names must be unique, got {names}")
    _validate_sequence_task(config)


def _validate_stage(stage: StageConfig, path: str) -> None:
    """A stage's values, every stage at load time (a later stage's mistake must not wait for it to start)."""
    from smskd_fast.training.methods import METHODS

    _check(stage.epochs >= 1, f"{path}.epochs", f"must be >= 1, got {stage.epochs}")
    _check(len(stage.methods) >= 1, f"{path}.methods", "needs at least one method (use 'none' for CE only)")
    _check(stage.weighting in WEIGHTINGS, f"{path}.weighting", f"must be one of {list(WEIGHTINGS)}, got {stage.weighting!r}")
    _check(stage.nonfinite in NONFINITE_POLICIES, f"{path}.nonfinite",
           f"must be one of {list(NONFINITE_POLICIES)}, got {stage.nonfinite!r}")
    _check_at_least(stage.temperature, f"{path}.temperature", 0, strict=True)
    for name in ("ce_weight", "ref_weight"):
        _check_at_least(getattr(stage, name), f"{path}.{name}", 0)
    _validate_optimizer(stage.optimizer, f"{path}.optimizer")
    _validate_schedule(stage.schedule, f"{path}.schedule")
    for m_index, method in enumerate(stage.methods):
        _check(method.name in METHODS, f"{path}.methods[{m_index}].name",
               f"unknown method {method.name!r}; choose one of {sorted(METHODS)}")
        if method.weight is not None:  # None: the method's customary weight
            _check_at_least(method.weight, f"{path}.methods[{m_index}].weight", 0)
        _check_method_params(METHODS[method.name], method, f"{path}.methods[{m_index}].params")


def _check_method_params(cls: type, method: MethodConfig, path: str) -> None:
    """Build the method (cheap: its layers and heads come later) so that a bad parameter is refused
    at load time, not when its stage starts."""
    try:
        cls(method.weight, **method.params)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path}: {error}", key=path) from None


def _validate_optimizer(spec: OptimizerConfig, path: str) -> None:
    """What torch refuses only when the optimizer is built, and a momentum that never decays."""
    from smskd_fast.training.optim import OPTIMIZERS

    _check(spec.name in OPTIMIZERS, f"{path}.name", f"must be one of {list(OPTIMIZERS)}, got {spec.name!r}")
    _check_at_least(spec.lr, f"{path}.lr", 0, strict=True)
    _check_at_least(spec.weight_decay, f"{path}.weight_decay", 0)
    _check(0 <= spec.momentum < 1, f"{path}.momentum", f"must be in [0, 1), got {spec.momentum}")
    _check(not spec.nesterov or spec.momentum > 0, f"{path}.nesterov",
           f"needs a momentum > 0, got momentum {spec.momentum}")
    if spec.name != "sgd":  # Adam's first moment is its beta1 (0.9, the momentum's default): nothing reads these
        _check(spec.momentum == SGD_MOMENTUM, f"{path}.momentum",
               f"applies to sgd only ({spec.name} keeps betas (0.9, 0.999)); leave it out or give "
               f"{SGD_MOMENTUM}, got {spec.momentum}")
        _check(not spec.nesterov, f"{path}.nesterov", f"applies to sgd only, not {spec.name}")


def _validate_schedule(spec: ScheduleConfig, path: str) -> None:
    """gamma scales the learning rate at each milestone: a factor <= 0 would make it 0 or negative."""
    from smskd_fast.training.optim import SCHEDULES

    _check(spec.name in SCHEDULES, f"{path}.name", f"must be one of {list(SCHEDULES)}, got {spec.name!r}")
    _check_at_least(spec.gamma, f"{path}.gamma", 0, strict=True)
    if spec.name != "multistep":  # only the multistep schedule reads them
        _check(not spec.milestones, f"{path}.milestones",
               f"apply to the multistep schedule only, not {spec.name}; leave them out or give [], "
               f"got {spec.milestones}")
        _check(spec.gamma == MULTISTEP_GAMMA, f"{path}.gamma",
               f"applies to the multistep schedule only, not {spec.name}; leave it out or give "
               f"{MULTISTEP_GAMMA}, got {spec.gamma}")
    increasing = all(a < b for a, b in zip(spec.milestones, spec.milestones[1:]))
    _check(increasing and all(m >= 0 for m in spec.milestones), f"{path}.milestones",
           f"must be strictly increasing epochs >= 0, got {spec.milestones}")


def _validate_sequence_task(config: RunConfig) -> None:
    """Language-model data takes only logit-based methods (feature and relation methods read image
    feature maps); fused_linear replaces the logits, so it takes no method with a loss of its own."""
    from smskd_fast.training.data import SEQUENCE_DATASETS

    sequence = config.data.name in SEQUENCE_DATASETS
    if sequence:
        _check(config.data.augment == "none", "data.augment",
               f"must be 'none' for data set {config.data.name!r}, got {config.data.augment!r}")
        _check(config.data.context_length >= 1, "data.context_length",
               f"must be >= 1, got {config.data.context_length}")
    stages = [(f"stages[{i}]", stage) for i, stage in enumerate(config.stages)]
    if config.teacher_training is not None:
        stages.append(("teacher_training", config.teacher_training))
    for path, stage in stages:
        for m_index, method in enumerate(stage.methods):
            if sequence:
                _check(method.name in SEQUENCE_METHODS, f"{path}.methods[{m_index}].name",
                       f"data set {config.data.name!r} takes only {list(SEQUENCE_METHODS)}, got {method.name!r}")
            if stage.fused_linear:
                _check(method.name in SEQUENCE_METHODS, f"{path}.methods[{m_index}].name",
                       f"fused_linear takes only {list(SEQUENCE_METHODS)}, got {method.name!r}")


def _validate_cache(config: RunConfig) -> None:
    from smskd_fast.training.logit_cache import FORMATS, STORED_DTYPES

    for role in ("teacher", "reference"):
        store, path = getattr(config.cache, role), f"cache.{role}"
        if store is None:
            continue
        _check(store.format in FORMATS, f"{path}.format", f"must be one of {list(FORMATS)}, got {store.format!r}")
        _check(store.dtype in STORED_DTYPES, f"{path}.dtype", f"must be one of {list(STORED_DTYPES)}, got {store.dtype!r}")
        _check(store.shard_rows >= 1, f"{path}.shard_rows", f"must be >= 1, got {store.shard_rows}")
        _check(store.batch_size >= 1, f"{path}.batch_size", f"must be >= 1, got {store.batch_size}")
        if store.format == "topk":
            _check(store.k >= 1, f"{path}.k", f"must be >= 1 for the top-k format, got {store.k}")
    if config.cache.teacher is not None:
        _check(config.cache.teacher.dir is not None, "cache.teacher.dir", "is required")
        _check(config.teacher is not None, "teacher", "is required: cache.teacher caches the teacher's logits")
    if config.cache.reference is not None:  # the reference term is a dense KL: there is no top-k form of it
        _check(config.cache.reference.format == "dense", "cache.reference.format",
               f"must be 'dense' (the reference term needs every logit), got {config.cache.reference.format!r}")


def _check_defaults_keys(defaults: Dict[str, Any]) -> None:
    """Builds `defaults:` as a stage (placeholders for the keys only a stage must give), so that an
    unknown key or a wrong type there is named defaults.KEY rather than stages[0].KEY."""
    placeholders = {"methods": [{"name": "none"}], "epochs": 1}
    _build(StageConfig, {**placeholders, **_expand_stage(defaults, {}, "defaults")}, "defaults")


_STAGE_KEY = re.compile(r"^(?:stages\[(\d+)\]|teacher_training)\.(\w+)(?:\[\d+\])?((?:\.\w+)*)$")


def _name_defaults_origin(error: ConfigError, stages: Any, teacher_stage: Any, defaults: Dict[str, Any]) -> ConfigError:
    """The error, saying "(from defaults.KEY)" when its stage value came from `defaults:`."""
    match = _STAGE_KEY.match(error.key or "")
    if not match or not defaults:
        return error
    index, first, rest = match.groups()
    own = teacher_stage if index is None else (stages[int(index)] if int(index) < len(stages) else None)
    keys = [first, *rest.split(".")[1:]]
    if first == "methods":  # given in either form
        keys = [next((form for form in METHOD_FORMS if isinstance(own, dict) and form in own), None)
                or next((form for form in METHOD_FORMS if form in defaults), first)]
    given, default = own, defaults
    for key in keys:
        given = given.get(key) if isinstance(given, dict) else None
        default = default.get(key) if isinstance(default, dict) else None
    if given is not None or default is None:
        return error
    return ConfigError(f"{error} (from defaults.{'.'.join(keys)})", key=error.key)


def parse_config(raw: Dict[str, Any]) -> RunConfig:
    """Validates a raw mapping (as read from YAML) into a RunConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    defaults = raw.pop("defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"defaults: expected a mapping, got {type(defaults).__name__}")
    _check_defaults_keys(defaults)
    stages, teacher_stage = raw.get("stages"), None
    if isinstance(stages, list):
        raw["stages"] = [_expand_stage(stage, defaults, f"stages[{i}]") for i, stage in enumerate(stages)]
    if isinstance(raw.get("teacher_training"), dict):  # the teacher trains alone (CE only)
        teacher_stage = dict(raw["teacher_training"])
        if "method" not in teacher_stage and "methods" not in teacher_stage:
            teacher_stage["method"] = "none"
        raw["teacher_training"] = _expand_stage(teacher_stage, defaults, "teacher_training")
    config = _build(RunConfig, raw, "")
    try:
        _validate(config)
    except ConfigError as error:
        raise _name_defaults_origin(error, stages if isinstance(stages, list) else [], teacher_stage, defaults) from None
    return config


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set value {text!r} is not valid YAML: {' '.join(str(error).split())}") from None


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Applies "a.b.c=value" overrides (value parsed as YAML; list items by index: stages.1.epochs=3).

    A stage gives its methods as `method` or `methods` (METHOD_FORMS): setting one form whole
    replaces the other; a path into the form the stage does not use is refused, with the same
    setting in the form it uses.
    """
    raw = copy.deepcopy(raw)
    applied: List[str] = []  # the overrides so far, to say where a method form came from
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key_path, text = item.split("=", 1)
        keys = key_path.strip().split(".")
        node: Any = raw
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            where = ".".join(keys[:depth + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"--set {key_path}: {where} is not an index of a list of {len(node)} items")
                key = int(key)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {key_path}: {'.'.join(keys[:depth])} is not a mapping or list")
            elif key in METHOD_FORMS and key not in node:
                other = METHOD_FORMS[1 - METHOD_FORMS.index(key)]
                if other in node and last:
                    del node[other]
                elif other in node:
                    raise _other_form_error(item, keys, depth, node[other], applied)
            if last:
                node[key] = _parse_value(text)
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                if isinstance(node[key], str) and (key == "method" or depth and keys[depth - 1] == "methods"):
                    node[key] = {"name": node[key]}  # `method: kd` is short for `method: {name: kd}`
                node = node[key]
        applied.append(item)
    return raw


def _other_form_error(item: str, keys: List[str], depth: int, given: Any, applied: List[str]) -> ConfigError:
    """The error for a --set path into keys[depth] (`method` or `methods`) of a stage that gives its
    methods in the other form (`given`), naming where that came from and the path that works."""
    key_path, text = item.split("=", 1)
    stage, key, rest = ".".join(keys[:depth]), keys[depth], keys[depth + 1:]
    other = METHOD_FORMS[1 - METHOD_FORMS.index(key)]
    earlier = [a for a in applied if f"{a.split('=', 1)[0].strip()}.".startswith(f"{stage}.{other}.")]
    origin = f"from --set {earlier[-1]}" if earlier else "in the config file"
    field_path = ".".join(rest[1:] if key == "methods" else rest)
    if key == "method" and isinstance(given, list) and len(given) == 1:
        way = f"use {stage}.methods.0.{field_path}={text}"
    elif key == "method":
        names = [m.get("name") if isinstance(m, dict) else m for m in given] if isinstance(given, list) else given
        way = f"use {stage}.methods.I.{field_path}={text}, I the method's place in the list {names} from 0"
    elif rest == ["0"]:
        way = f"use {stage}.method={text}"
    elif rest[0] == "0":
        way = f"use {stage}.method.{field_path}={text}"
    else:
        way = f"set {stage}.method (the stage's one method), or the whole list with {stage}.methods=[...]"
    return ConfigError(f"--set {key_path}: {stage} gives its methods by '{other}' ({origin}), not by '{key}' "
                       f"('method: X' is short for 'methods: [X]'); {way}")


def load_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> RunConfig:
    """Reads, overrides and validates a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; give the path of a YAML run config (examples: configs/)")
    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    return parse_config(apply_overrides(raw, overrides))


def config_to_dict(config: RunConfig) -> Dict[str, Any]:
    """The resolved config as plain data (written to the run directory as config.yaml)."""
    return dataclasses.asdict(config)
