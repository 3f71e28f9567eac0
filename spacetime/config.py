"""Config machinery: YAML files validated by pydantic models that reject unknown keys.

Each wing defines its own sections on `StrictModel`; the sections more than one wing uses
(`Resources`, `S3Config`) live here.

Every subcommand takes `--config FILE` and repeated `--set dotted.key=value`; values given to `--set`
are parsed as YAML scalars/flow collections (`--set analyze.height=180`, `--set inputs=[a,b]`).
A misspelt key fails with the key's dotted path and the file it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spacetime.errors import UserError

T = TypeVar("T", bound="StrictModel")


class ConfigError(UserError, ValueError):
    """A config file or override that does not validate; the message names the key and the fix."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated.
    `affects_results = False` on a section (resources, transport, logging) leaves it out of
    `result_fingerprint`; a single field is left out with `Field(..., json_schema_extra=NOT_A_RESULT)`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    affects_results: ClassVar[bool] = True


# A setting that changes no output byte (where to connect, how long to wait, how often to retry, how
# much memory to reserve): a rerun may change it. See result_fingerprint.
NOT_A_RESULT = {"affects_results": False}


def result_fingerprint(cfg: BaseModel) -> dict:
    """The settings of `cfg` that decide an output's bytes, as JSON: every field but those of sections
    with `affects_results = False` and fields marked NOT_A_RESULT. A resumed or grown output must be
    made with the same fingerprint (curation.rundir.RunDir.claim)."""
    dumped = cfg.model_dump(mode="json")
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if (field.json_schema_extra or {}).get("affects_results") is False or (
                isinstance(value, StrictModel) and not value.affects_results):
            dumped.pop(name)
        elif isinstance(value, BaseModel):
            dumped[name] = result_fingerprint(value)
    return dumped


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`dotted.key: old -> new` for every leaf that differs between two JSON trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new), key=str)
                for line in differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class TaskResources(StrictModel):
    """How Ray runs a stage without a model: as Ray tasks, one per block of rows (a source, for the
    stages before the models), each holding num_cpus / num_gpus while it runs. As many run at once as
    the cluster has room for, so the same config fills 2 cores or 64. Consecutive stages with equal
    requests run fused: one task does them all, in one process (Ray Data's operator fusion)."""

    affects_results: ClassVar[bool] = False
    num_cpus: float = 1.0
    num_gpus: float = 0.0


class ActorResources(StrictModel):
    """How Ray runs a model stage: a pool of actors, each loading the model once and holding
    num_cpus / num_gpus while it lives. The pool starts with `actors` and Ray Data grows it up to
    `max_actors` while work queues up (None: a fixed pool of `actors`)."""

    affects_results: ClassVar[bool] = False
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actors: int = Field(default=1, ge=1)
    max_actors: int | None = Field(default=None, ge=1)
    batch_size: int = 1
    calls_per_actor: int = 1  # batches in flight per actor (async stages keep an engine's batch full)


class S3Config(StrictModel):
    """s3:// URIs through pyarrow's S3FileSystem (spacetime.io). Credentials come from the usual AWS
    environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and are never written to config
    or logs. Where the bytes are is not what they are: no setting here is part of a result."""

    affects_results: ClassVar[bool] = False
    endpoint: str | None = None  # e.g. http://127.0.0.1:9000; default: $AWS_ENDPOINT_URL or AWS
    region: str = "us-east-1"
    anonymous: bool = False


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3). The value is read as YAML, so `true`, `1.5`, `[1, 2]` are typed."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{where}' (misspelt? see the config's section for valid keys)")
        else:
            lines.append(f"{source}: {where}: {e['msg']}")
    return "\n".join(lines)


def load_config(model: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read `path` (YAML; may be None for defaults), apply `key=value` overrides, validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for text in overrides or []:
        _set_dotted(tree, *parse_override(text))
    if overrides:
        source += " + --set"
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what `--print-config` prints and runs record)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
