"""The declared Tune search: which settings to vary, over what ranges, and how to search.

A space file (YAML) names dotted settings of :class:`~qpacknet.config.RunConfig` and one
distribution each, plus the search's own knobs. Everything is checked before any trial
starts: unknown keys, empty ranges, and range corners that would make an invalid run config
(e.g. ``search.v_min`` above ``search.v_max``) fail with the key named.
"""

from __future__ import annotations

import copy
import itertools
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qpacknet.config import RunConfig, check_key, error_lines, read_yaml, set_key, validate
from qpacknet.errors import ConfigError

SPACES_PACKAGE = "qpacknet.presets.spaces"
DEFAULT_SPACE = "method"
_MAX_CORNERS = 4096
_KINDS = ("uniform", "loguniform", "randint", "choice", "grid")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of: ``uniform: [lo, hi]``, ``loguniform: [lo, hi]``, ``randint: [lo, hi)``,
    ``choice: [v1, v2, ...]`` (sampled), or ``grid: [v1, v2, ...]`` (every value, in order;
    ``num_samples`` then repeats the whole grid)."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        given = [k for k in _KINDS if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(_KINDS)}")
        lo_hi = self.uniform or self.loguniform or self.randint
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"{given[0]}: lower bound {lo_hi[0]} must be below {lo_hi[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: bounds must be positive")
        return self

    def corners(self) -> list[Any]:
        """The extreme values a sample can take (every value for a choice)."""
        if self.choice is not None or self.grid is not None:
            return list(self.choice or self.grid or [])
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        lo, hi = self.uniform or self.loguniform  # type: ignore[misc]
        return [lo, hi]

    def to_tune(self) -> Any:
        from ray import tune

        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        if self.randint is not None:
            return tune.randint(*self.randint)
        if self.grid is not None:
            return tune.grid_search(self.grid)
        return tune.choice(self.choice)


class TuneSpec(_Strict):
    """A Tune search over whole (short) scenario runs, one trial per sampled config."""

    num_samples: int = Field(8, ge=1, description="trials to run")
    metric: Literal["val_acc"] = Field(
        "val_acc",
        description="ASHA compares trials on this after each task: the mean validation "
        "accuracy of the packed model (test accuracy is reported, never used to choose)",
    )
    grace_period: int = Field(
        1, ge=1, description="tasks every trial runs before it can be stopped"
    )
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA keeps 1/this of trials per rung")
    max_failures: int = Field(
        2, ge=0, description="retries of a failed trial (from its checkpoint)"
    )
    max_concurrent: int | None = Field(None, ge=1, description="trials at once; None: as fit")
    cpus_per_trial: float = Field(1.0, gt=0.0)
    gpus_per_trial: float = Field(0.0, ge=0.0)
    seed: int = Field(0, ge=0, description="seed of the sampler (the run seed is in the base)")
    space: dict[str, Distribution] = Field(min_length=1)

    def param_space(self) -> dict[str, Any]:
        return {key: dist.to_tune() for key, dist in self.space.items()}


def trial_config(base: dict[str, Any], sample: dict[str, Any]) -> RunConfig:
    """The base settings with one trial's sampled values put in place, validated."""
    data = copy.deepcopy(base)
    for key, value in sample.items():
        set_key(data, key, value)
    return validate(data)


def check_spec(spec: TuneSpec, base: dict[str, Any]) -> None:
    """Fail before any trial runs if a key is unknown or a corner of the ranges is invalid."""
    for key in spec.space:
        check_key(key)
    keys = list(spec.space)
    corners = [spec.space[k].corners() for k in keys]
    combos = 1
    for c in corners:
        combos *= len(c)
    if combos <= _MAX_CORNERS:
        candidates = (
            dict(zip(keys, values, strict=True)) for values in itertools.product(*corners)
        )
    else:
        candidates = ({k: v} for k, c in zip(keys, corners, strict=True) for v in c)
    for sample in candidates:
        try:
            trial_config(base, sample)
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v}" for k, v in sample.items())
            raise ConfigError(
                f"tune space: the sample {shown} makes an invalid config; narrow the ranges "
                f"so every sample is valid.\n{exc}"
            ) from None


def space_names() -> list[str]:
    root = resources.files(SPACES_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_spec(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TuneSpec:
    """A space file (``path``), or the shipped ``method`` space; ``overrides`` replace top-level
    knobs such as ``num_samples``. Errors name the file and the offending key."""
    if path is None:
        where = f"shipped tune space {DEFAULT_SPACE!r}"
        text = resources.files(SPACES_PACKAGE).joinpath(f"{DEFAULT_SPACE}.yaml").read_text()
    else:
        p = Path(path)
        where = f"tune space file {str(p)!r}"
        if not p.is_file():
            raise ConfigError(f"{where} does not exist")
        text = p.read_text()
    data = read_yaml(text, where)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TuneSpec.model_validate(data)
    except ValidationError as exc:
        lines = error_lines(exc, "unknown key")
        raise ConfigError(f"{where} is invalid:\n" + "\n".join(lines)) from None
