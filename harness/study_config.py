"""Study definitions (studies/*.yaml): parsing and validation before any training starts.

A study file names a base preset, config overrides shared by every trial, a search space over any
config key, the sampler, pruner, budget, objectives, storage and evaluation. Every error names the key
and the accepted values.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.config import RunConfig, apply_dict, load_config, parse_override, resolve_preset, validate

PARAM_TYPES = ("float", "int", "categorical", "fixed")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("minimize", "maximize")
OBJECTIVE_METRICS = ("val/ppl", "test/ppl", "pi/comm_gb", "pi/latency_min")
TOP_KEYS = ("name", "preset", "overrides", "search_space", "sampler", "pruner", "n_trials", "timeout_minutes",
            "objectives", "storage", "tracking_uri", "enqueue", "evaluation", "description")
# `preset` may also be a search dimension (categorical over models/*.yaml names), as in a grid over architectures
PRESET_KEY = "preset"


@dataclass
class ParamSpec:
    """One search dimension: float (optionally log or stepped), int, categorical or fixed."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    value: Any = None


@dataclass
class EvaluationSpec:
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 8
    seed: int = 1234


@dataclass
class StudySpec:
    name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    search_space: list[ParamSpec] = field(default_factory=list)
    sampler: dict = field(default_factory=lambda: {"type": "tpe", "seed": 0})
    pruner: dict = field(default_factory=lambda: {"type": "median"})
    n_trials: int | None = 10
    timeout_minutes: float | None = None
    objectives: list[dict] = field(default_factory=lambda: [{"metric": "val/ppl", "direction": "minimize"}])
    storage: str = "sqlite:///optuna.db"
    tracking_uri: str = ""
    enqueue: list[dict] = field(default_factory=list)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    source: str = ""

    @property
    def directions(self) -> list[str]:
        return [o["direction"] for o in self.objectives]


def _fail(key: str, message: str) -> None:
    raise ValueError(f"invalid study key {key!r}: {message}")


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        _fail(key, f"{value!r} is not accepted; accepted values are {list(allowed)}")


def _parse_param(key: str, spec: Any) -> ParamSpec:
    """Parse one search-space entry; a bare list is categorical and a bare scalar is fixed."""
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    elif not isinstance(spec, dict):
        spec = {"type": "fixed", "value": spec}
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "value"}
    if unknown:
        _fail(f"search_space.{key}", f"unknown fields {sorted(unknown)}; accepted: type, low, high, log, step, choices, value")
    kind = spec.get("type")
    _check_choice(f"search_space.{key}.type", kind, PARAM_TYPES)
    param = ParamSpec(key=key, type=kind, log=bool(spec.get("log", False)), step=spec.get("step"),
                      choices=spec.get("choices"), value=spec.get("value"))
    if kind in ("float", "int"):
        for bound in ("low", "high"):
            if not isinstance(spec.get(bound), (int, float)) or isinstance(spec.get(bound), bool):
                _fail(f"search_space.{key}.{bound}", f"a {kind} dimension needs a numeric {bound}, got {spec.get(bound)!r}")
        param.low, param.high = float(spec["low"]), float(spec["high"])
        if param.low > param.high:
            _fail(f"search_space.{key}", f"low={param.low} is greater than high={param.high}")
        if param.log and param.low <= 0:
            _fail(f"search_space.{key}", f"a log range needs low > 0, got low={param.low}")
        if param.log and param.step is not None:
            _fail(f"search_space.{key}", "log and step cannot be combined")
    elif kind == "categorical" and (not isinstance(param.choices, list) or not param.choices):
        _fail(f"search_space.{key}.choices", "a categorical dimension needs a non-empty list of choices")
    elif kind == "fixed" and "value" not in spec:
        _fail(f"search_space.{key}.value", "a fixed dimension needs a value")
    return param


def _candidate_values(param: ParamSpec) -> list:
    """Return the values to check against the config: every choice, both bounds, or the fixed value."""
    if param.type == "categorical":
        return list(param.choices)
    if param.type == "fixed":
        return [param.value]
    bounds = [param.low, param.high]
    return [int(b) for b in bounds] if param.type == "int" else bounds


def _check_objectives(objectives: Any) -> list[dict]:
    if not isinstance(objectives, list) or not objectives:
        _fail("objectives", "expected a non-empty list of {metric, direction}")
    parsed = []
    for i, obj in enumerate(objectives):
        obj = {"metric": obj} if isinstance(obj, str) else dict(obj)
        _check_choice(f"objectives[{i}].metric", obj.get("metric"), OBJECTIVE_METRICS)
        obj.setdefault("direction", "minimize")
        _check_choice(f"objectives[{i}].direction", obj["direction"], DIRECTIONS)
        parsed.append(obj)
    return parsed


def _check_sampler_pruner(spec: StudySpec) -> None:
    _check_choice("sampler.type", spec.sampler.get("type", "tpe"), SAMPLERS)
    _check_choice("pruner.type", spec.pruner.get("type", "median"), PRUNERS)
    if spec.sampler.get("type") == "grid":
        for p in spec.search_space:
            if p.type in ("float", "int") and p.step is None:
                _fail(f"search_space.{p.key}", "grid sampling needs categorical or fixed dimensions, or a float/int with step")


def trial_config(spec: StudySpec, params: dict[str, Any], trial_number: int | None = None) -> RunConfig:
    """Build one trial's RunConfig: preset < study overrides < sampled params."""
    params = dict(params)
    preset = params.pop(PRESET_KEY, spec.preset)
    cfg = load_config(preset)
    apply_dict(cfg, _nest(spec.overrides))
    apply_dict(cfg, _nest(params))
    cfg.name = f"{spec.name}/trial_{trial_number}" if trial_number is not None else f"{spec.name}/check"
    validate(cfg)
    return cfg


def _nest(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def _check_against_config(spec: StudySpec) -> None:
    """Build a trial config for every candidate value, so bad keys and values fail before training."""
    example = {p.key: _candidate_values(p)[0] for p in spec.search_space}
    rows = [{**example, p.key: value} for p in spec.search_space for value in _candidate_values(p)]
    for row in rows:
        try:
            trial_config(spec, row)
        except ValueError as err:
            raise ValueError(f"invalid study {spec.name!r}: {err}") from None
    for i, row in enumerate(spec.enqueue):
        try:
            trial_config(spec, {**example, **row})
        except ValueError as err:
            raise ValueError(f"invalid study key 'enqueue[{i}]': {err}") from None


def _check_tasks(tasks: list[str]) -> None:
    """Reject unknown lm-eval task names; stock names are looked up in lm-eval's registry (about 9 s)."""
    from harness.lmeval_tasks import CORPUS_TASK, LOCAL_TASKS, TASK_PREFIX

    if not isinstance(tasks, list):
        _fail("evaluation.tasks", f"expected a list of task names, got {tasks!r}")
    stock = [t for t in tasks if t != CORPUS_TASK and t.removeprefix(TASK_PREFIX) not in LOCAL_TASKS]
    if not stock:
        return
    from lm_eval.tasks import TaskManager

    unknown = [t for t in stock if t not in TaskManager().all_tasks]
    if unknown:
        _fail("evaluation.tasks", f"unknown tasks {unknown}; local tasks are {[CORPUS_TASK, *LOCAL_TASKS]}, "
                                  "other names must be in lm-eval's registry")


def parse_study(tree: dict, source: str = "") -> StudySpec:
    """Validate a study mapping (as read from YAML) and return a StudySpec."""
    if not isinstance(tree, dict):
        raise ValueError(f"invalid study file {source}: expected a mapping of study keys {list(TOP_KEYS)}")
    for key in tree:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(key, TOP_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            _fail(key, f"unknown key{hint}; accepted keys are {list(TOP_KEYS)}")
    for key in ("name", "preset"):
        if not isinstance(tree.get(key), str) or not tree[key]:
            _fail(key, "missing or empty; it must be a string")
    resolve_preset(tree["preset"])
    space = tree.get("search_space")
    if not isinstance(space, dict) or not space:
        _fail("search_space", "the search space is empty; give at least one dimension, e.g. entropy.loss_coeff")
    spec = StudySpec(name=tree["name"], preset=tree["preset"], source=source)
    spec.overrides = dict(tree.get("overrides") or {})
    spec.search_space = [_parse_param(k, v) for k, v in space.items()]
    spec.sampler = {"type": "tpe", "seed": 0, **(tree.get("sampler") or {})}
    spec.pruner = {"type": "median", **(tree.get("pruner") or {})}
    spec.n_trials = tree.get("n_trials", spec.n_trials)
    spec.timeout_minutes = tree.get("timeout_minutes")
    if spec.n_trials is None and spec.timeout_minutes is None:
        _fail("n_trials", "give n_trials, timeout_minutes or both")
    if spec.n_trials is not None and (not isinstance(spec.n_trials, int) or spec.n_trials < 1):
        _fail("n_trials", f"must be a positive integer, got {spec.n_trials!r}")
    spec.objectives = _check_objectives(tree.get("objectives", spec.objectives))
    spec.storage = str(tree.get("storage", spec.storage))
    spec.tracking_uri = str(tree.get("tracking_uri") or "")
    spec.enqueue = list(tree.get("enqueue") or [])
    evaluation = tree.get("evaluation") or {}
    unknown = set(evaluation) - {"tasks", "limit", "batch_size", "seed"}
    if unknown:
        _fail("evaluation", f"unknown fields {sorted(unknown)}; accepted: tasks, limit, batch_size, seed")
    spec.evaluation = EvaluationSpec(**evaluation)
    _check_tasks(spec.evaluation.tasks)
    _check_sampler_pruner(spec)
    _check_against_config(spec)
    return spec


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """Read and validate a study file, applying `key.sub=value` overrides to it first."""
    path = Path(path)
    if not path.is_file():
        available = sorted(str(p) for p in Path("studies").glob("*.yaml"))
        raise ValueError(f"study file {str(path)!r} not found; available: {available}")
    with open(path) as f:
        tree = yaml.safe_load(f) or {}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_study_key(tree, key, yaml.safe_load(value))
    return parse_study(tree, str(path))


def _set_study_key(tree: dict, key: str, value: Any) -> None:
    """Apply one override: a study key (n_trials, sampler.seed, ...) or else a trial config key.

    `train.max_steps=50` and `overrides.train.max_steps=50` both set the trials' config;
    `search_space.entropy.tolerance=0.2` fixes that dimension.
    """
    parts = key.split(".")
    if parts[0] not in TOP_KEYS:
        parts = ["overrides", key]
    if parts[0] in ("overrides", "search_space") and len(parts) > 1:
        tree.setdefault(parts[0], {})[".".join(parts[1:])] = value
        return
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def study_as_dict(spec: StudySpec) -> dict:
    """Return the validated study as a plain dict (for the parent run's artifact)."""
    import dataclasses

    return copy.deepcopy(dataclasses.asdict(spec))

