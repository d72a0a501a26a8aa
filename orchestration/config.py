"""The root run config: each package's section composed into one strict tree.

    cfg = load_config("configs/quickstart.yaml", ["train.lr_init=3e-4", "model.n_layer=6"])

YAML is read, dotted `key=value` overrides are applied (values parsed as YAML scalars), and pydantic
validates the whole tree. Any problem raises `ConfigError` naming the field and the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model.config import ModelConfig
from pipeline.config import EvalConfig, ExtendStageConfig, TrainConfig
from tokenization.config import DataConfig, TokenizerConfig


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names field and source."""


class RayConfig(BaseModel):
    """Where stages run: a local Ray cluster by default, or the one at `address`."""

    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(
        None, description="Cluster to join (host:port); null starts a local one, or joins RAY_ADDRESS when set."
    )
    num_workers: int = Field(2, ge=1, description="Training workers (one per GPU when use_gpu).")
    use_gpu: bool = Field(False, description="Give each training worker one GPU.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")
    data_workers: int = Field(0, ge=0, description="Parallel tokenization tasks; 0 = all CPUs.")
    max_retries: int = Field(2, ge=0, description="Retries of a failed data task or training group.")
    stage_retries: int = Field(1, ge=0, description="Reruns of a failed stage (resuming its partial output).")


class TrackingConfig(BaseModel):
    """MLflow: one parent run per pipeline run, one nested run per stage."""

    model_config = ConfigDict(extra="forbid")
    uri: str | None = Field(
        None, description="MLflow tracking URI; null = MLFLOW_TRACKING_URI if set, else SQLite in the workdir."
    )
    experiment: str = Field("rwkv-pipeline", description="MLflow experiment name.")
    system_metrics: bool = Field(True, description="Log CPU/GPU/memory system metrics.")
    system_metrics_interval_s: float = Field(10.0, gt=0, description="Seconds between system metric samples.")
    flush_timeout_s: float = Field(120.0, ge=0, description="At the end, wait this long for an absent server.")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("run", description="Run name; outputs go to <workdir>/<name>/.")
    workdir: str = Field("runs", description="Root folder of run directories.")
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    extend: list[ExtendStageConfig] = Field(default_factory=list, description="Context-extension stages.")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(f"{name!r} is not a folder name (letters, digits, '.', '_', '-'; no '/')")
        return name


def apply_override(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set `a.b.c=value` inside nested dicts, creating levels as needed; an item of a list the config
    already holds by its index (`extend.0.steps=20`)."""
    keys = dotted_key.split(".")
    node: Any = tree
    for depth, part in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(dotted_key, ".".join(keys[:depth]), node, part)]
            continue
        if part not in node and keys[depth + 1].isdigit():  # `extend.0.x` where the config has no extend list
            node[part] = []
        node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"override '{dotted_key}': '{part}' is a value, not a section")
    if isinstance(node, list):
        node[_list_index(dotted_key, ".".join(keys[:-1]), node, keys[-1])] = value
    else:
        node[keys[-1]] = value


def _list_index(dotted_key: str, list_name: str, items: list[Any], part: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    example = "[{ctx_len: 2048, steps: 100}]" if list_name == "extend" else "[...]"
    raise ConfigError(
        f"override '{dotted_key}': {list_name} holds {len(items)} item(s), so there is no item {part} to change; "
        f"give the whole list instead, e.g. {list_name}={example}"
    )


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr_init=3e-4)")
        pairs.append((key.strip(), _override_value(raw)))
    return pairs


def _override_value(raw: str) -> Any:
    """The value as YAML reads it, except that a bare word ending in a colon (`data.paths=stdlib:`) stays
    text: YAML would make it a one-key mapping, which no field takes."""
    if not raw:
        return None
    value = yaml.safe_load(raw)
    if isinstance(value, dict) and raw.strip().endswith(":") and list(value.values()) == [None]:
        return raw.strip()
    return value


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"])
        message = (
            "unknown field"
            if problem["type"] in ("extra_forbidden", "unexpected_keyword_argument")
            else problem["msg"].removeprefix("Value error, ")
        )
        lines.append(f"  {field}: {message} (got {problem.get('input')!r})")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as stream:  # a stream, so that YAML errors name the file, not "<unicode string>"
            tree = yaml.safe_load(stream) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def build_config(tree: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    except ValueError as exc:  # raised by a section's own checks (e.g. ModelConfig.__post_init__)
        raise ConfigError(f"invalid config ({source}): {exc}") from None
    _check_extension_lengths(config, source)
    return config


def _check_extension_lengths(config: RunConfig, source: str) -> None:
    """Each context-extension stage trains at a longer context than the stage before it."""
    previous, field = config.train.ctx_len, "train.ctx_len"
    for number, extension in enumerate(config.extend):
        if extension.ctx_len <= previous:
            raise ConfigError(
                f"invalid config ({source}): extend.{number}.ctx_len={extension.ctx_len} is not longer than "
                f"{field}={previous}; an extension stage continues the stage before it at a longer context"
            )
        previous, field = extension.ctx_len, f"extend.{number}.ctx_len"


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML (or defaults when path is None), apply dotted overrides, validate."""
    tree = read_yaml(path) if path is not None else {}
    pairs = parse_overrides(overrides or [])
    for key, value in pairs:
        apply_override(tree, key, value)
    source = str(path) if path is not None else "defaults"
    if pairs:
        source += " + overrides " + " ".join(f"{k}={v}" for k, v in pairs)
    return build_config(tree, source)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
