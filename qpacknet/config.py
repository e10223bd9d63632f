"""Every setting of a run as pydantic models; YAML presets; ``--set`` overrides.

Defaults are the paper's (Ada-QPacknet, Section 4.1; DESIGN.md §2). Unknown keys are
rejected everywhere (like nanoGPT's overrides), wrong types and impossible values raise
:class:`~qpacknet.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qpacknet.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScenarioConfig(_Strict):
    """Which task stream to learn."""

    name: Literal[
        "pmnist",
        "digits",
        "npz",
        "folders",
        "cifar100",
        "five_datasets",
        "tinyimagenet",
        "imagenet100",
    ] = "pmnist"
    path: str | None = Field(
        None,
        description="npz: the folder with one .npz file per task; folders: the folder with "
        "one image folder per task (the user's own data); image scenarios: their data root "
        "instead of --data-dir",
    )
    num_tasks: int = Field(10, ge=1, le=1000)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of train held out")
    train_limit: int | None = Field(
        None, ge=10, description="use at most this many training rows per task (quick runs)"
    )

    @model_validator(mode="after")
    def _check(self) -> ScenarioConfig:
        if self.name in ("npz", "folders") and not self.path:
            what = {
                "npz": "the folder of .npz task files",
                "folders": "the folder with one sub-folder of images per task",
            }[self.name]
            raise ValueError(f"scenario {self.name} needs scenario.path: {what}")
        return self


class NetConfig(_Strict):
    """Backbone (DESIGN.md §3); per-task heads are always float32 linear layers.

    ``mlp`` (p-MNIST) uses ``hidden``; the conv backbones (``alexnet`` for split CIFAR-100,
    ``resnet18_reduced`` for 5-datasets, ``resnet18`` for Imagenet100, ``tinynet`` for
    TinyImagenet) take image inputs and use ``width``, ``dropout`` and ``channels_last``.
    """

    backbone: Literal["mlp", "alexnet", "resnet18_reduced", "resnet18", "tinynet"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [100, 100])
    width: float = Field(
        1.0, gt=0.0, le=16.0, description="conv backbones: multiplier of every channel/fc width"
    )
    dropout: bool = Field(
        True, description="alexnet: dropout 0.2 after conv1-2, 0.5 after conv3 and fc1-2"
    )
    channels_last: bool = Field(
        False, description="conv backbones: channels-last activations (a speed setting)"
    )

    @model_validator(mode="after")
    def _check(self) -> NetConfig:
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError("hidden must be a non-empty list of positive layer widths")
        return self


class SearchConfig(_Strict):
    """SEARCH stage (Algorithm 1): P_S random sparse candidates, E_short epochs, α/β score."""

    population: int = Field(16, ge=1, description="P_S")
    v_min: float = Field(0.45, ge=0.0, lt=1.0, description="lowest per-layer sparsity")
    v_max: float = Field(0.85, ge=0.0, lt=1.0, description="highest per-layer sparsity")
    alpha: float = Field(0.9, ge=0.0, description="weight of accuracy in the score (eq. 8)")
    beta: float = Field(0.1, ge=0.0, description="weight of sparsity in the score (eq. 8)")
    epochs: int = Field(5, ge=1, description="E_short")

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if self.v_min > self.v_max:
            raise ValueError(f"v_min ({self.v_min}) must not exceed v_max ({self.v_max})")
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta cannot both be 0")
        return self


class SharingConfig(_Strict):
    """TinySubNets weight sharing (DESIGN.md §2), off by default: each candidate also reads a
    random part of the weights earlier tasks claimed, read-only and at no cost in bits.

    Per candidate and layer a fraction ``f ~ U[min_fraction, max_fraction]`` of the layer's
    claimed weights that the candidate does not own is drawn uniformly (keyed like its mask by
    seed, task and candidate index). The range is this project's choice; TinySubNets shares by
    reusing earlier tasks' weights wherever they help, which a random draw approximates in the
    same way Algorithm 1 approximates pruning."""

    enabled: bool = Field(False, description="share earlier tasks' weights (TinySubNets)")
    min_fraction: float = Field(0.2, ge=0.0, le=1.0, description="lowest share fraction")
    max_fraction: float = Field(0.8, ge=0.0, le=1.0, description="highest share fraction")

    @model_validator(mode="after")
    def _check(self) -> SharingConfig:
        if self.min_fraction > self.max_fraction:
            raise ValueError(
                f"min_fraction ({self.min_fraction}) must not exceed max_fraction "
                f"({self.max_fraction})"
            )
        return self


class CapacityConfig(_Strict):
    """What a long stream does when the words are full, and with a task that learned nothing
    (DESIGN.md §2, "When the words are full"). Neither changes a task that is already
    committed, so a run may be resumed under another policy.

    ``when_full`` applies when, before SEARCH, some layer has fewer available weights than a
    candidate's minimum density ``1 - search.v_max``: ``grow`` opens a new network (same
    backbone, fresh words) for this and later tasks; ``share`` lets the task read the earlier
    tasks' frozen weights (TinySubNets) besides what is left; ``stop`` exits 2 before training
    it. The quality gate compares TRAIN's best validation accuracy with chance (the largest
    class's share of the validation split)."""

    when_full: Literal["grow", "share", "stop"] = Field(
        "grow", description="a layer cannot give a new task its minimum density: grow|share|stop"
    )
    quality_gate: Literal["stop", "warn"] = Field(
        "stop", description="a task within chance_margin of chance: stop the run, or warn+mark"
    )
    chance_margin: float = Field(
        10.0, ge=0.0, le=100.0, description="points above chance TRAIN's val accuracy must reach"
    )


class TrainConfig(_Strict):
    """Optimiser and schedule shared by SEARCH and TRAIN (the paper gives only the lr range)."""

    epochs: int = Field(50, ge=1, description="E_full")
    lr: float = Field(0.01, gt=0.0)
    lr_min: float = Field(0.0001, ge=0.0, description="floor of the cosine decay in TRAIN")
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="training targets: 1 - eps on the label, eps spread over the classes "
        "(validation figures always use the plain labels)",
    )
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(8192, ge=1)
    allow_tf32: bool = Field(
        False,
        description="CUDA only: allow TF32 matmuls/convolutions (faster, but the same seed "
        "may then pick another winner); off: deterministic float32",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min}) must not exceed lr ({self.lr})")
        return self


class QuantizeConfig(_Strict):
    """QUANTIZE stage (Algorithms 2-3) and the word layout."""

    psi_min: int = Field(1, ge=1, le=32, description="first bit-width tried")
    b_max: int = Field(8, ge=1, le=32, description="widest component; availability rule")
    delta: float = Field(
        1.0, ge=0.0, description="allowed validation-accuracy drop, points (every criterion)"
    )
    criterion: Literal["accuracy", "loss", "agreement"] = Field(
        "loss",
        description="when a bit width is accepted (Algorithm 3): always the paper's "
        "Q_q >= Q - delta, and with loss also a validation cross-entropy at most "
        "loss_tolerance nats above the float network's, with agreement also at least "
        "min_agreement % of validation inputs keeping the float network's predicted class",
    )
    delta_se: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="widen delta to this many standard errors of the paired validation-accuracy "
        "difference (McNemar) where that is more: a drop the validation set cannot tell from "
        "chance passes; 0: delta alone (the paper)",
    )
    loss_tolerance: float = Field(
        0.01,
        ge=0.0,
        le=10.0,
        description="criterion loss: allowed rise of the mean validation cross-entropy, nats "
        "(0.01: the true class keeps 99 % of its geometric-mean probability)",
    )
    min_agreement: float = Field(
        99.0,
        ge=0.0,
        le=100.0,
        description="criterion agreement: least % of validation predictions equal to the "
        "float network's",
    )
    kmeans_iters: int = Field(50, ge=1)
    per_layer: bool = Field(
        False,
        description="per-layer bit widths (the paper's future 'hybrid quantisation'): after "
        "Algorithm 3's one width, lower each layer's own width (most owned weights first) "
        "while the criterion still accepts",
    )
    finetune_epochs: int = Field(
        0,
        ge=0,
        le=100,
        description="codebook fine-tuning (Deep Compression §3): epochs of the task's training "
        "data that train each width's centroids (every weight keeps its code) before the "
        "criterion judges it; 0: off (the paper)",
    )
    finetune_target: Literal["float", "labels"] = Field(
        "float",
        description="what codebook fine-tuning fits: float (the float network's softmax on the "
        "training inputs, KL divergence) or labels (cross-entropy)",
    )
    finetune_lr: float = Field(
        1e-4, gt=0.0, le=1.0, description="Adam learning rate of codebook fine-tuning"
    )
    finetune_head: bool = Field(
        False,
        description="codebook fine-tuning also trains the task's own float tensors (head, "
        "normalisation affine) with the centroids, so that they adapt to the quantised "
        "features; they are the task's private float32 parameters, so no bit is added",
    )

    @model_validator(mode="after")
    def _check(self) -> QuantizeConfig:
        if self.psi_min > self.b_max:
            raise ValueError(f"psi_min ({self.psi_min}) must not exceed b_max ({self.b_max})")
        if self.finetune_head and not self.finetune_epochs:
            raise ValueError(
                "finetune_head trains the task's head during codebook fine-tuning, which is "
                "off: set quantize.finetune_epochs to 1 or more, or finetune_head to false"
            )
        return self


class ExecutorConfig(_Strict):
    """Where candidates are trained.

    ``candidates_per_worker`` chunks the population: each worker (an in-process object or a
    Ray actor) trains its chunk as one population. Unset, the population is spread evenly over
    the actors, so N GPU workers train N chunks at once (the local executor makes
    ``workers`` chunks when that is a number, else one). The Ray settings say how many actors
    to start and what each one reserves; ``"auto"`` means as many actors as the cluster fits
    and one GPU per actor when the cluster has GPUs or its autoscaler can add GPU nodes
    (DESIGN.md §7: one process per GPU is the efficient default; fractions are for small
    models and tests). The chunking is recorded in results.json: a population's float rounding
    depends on its size, so set ``candidates_per_worker`` to get bit-identical runs on
    clusters of different sizes.
    """

    kind: Literal["local", "ray"] = Field(
        "ray", description="ray: actors on the Ray cluster (embedded if none); local: in-process"
    )
    candidates_per_worker: int | None = Field(
        None,
        ge=1,
        description="candidates trained as one population; None = spread over the workers",
    )
    workers: int | Literal["auto"] = Field("auto", description="Ray actors (or 'auto')")
    gpus_per_worker: float | Literal["auto"] = Field("auto", description="GPUs per actor")
    cpus_per_worker: float | Literal["auto"] = Field(
        "auto", description="CPUs (and torch threads) per actor; auto: 1 with GPUs, else a share"
    )
    max_retries: int = Field(3, ge=0, description="re-runs of a chunk whose actor died")

    @model_validator(mode="after")
    def _check(self) -> ExecutorConfig:
        if isinstance(self.workers, int) and self.workers < 1:
            raise ValueError(f"workers must be >= 1 or 'auto', got {self.workers}")
        if isinstance(self.cpus_per_worker, float) and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0 or 'auto', got {self.cpus_per_worker}")
        if isinstance(self.gpus_per_worker, float) and self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        return self


class TrackingConfig(_Strict):
    """MLflow tracking (issue: every run browsable). Tracking never changes what is learned, so
    these settings may differ when a run is resumed."""

    enabled: bool = Field(True, description="log runs, artifacts and models to MLflow")
    uri: str | None = Field(
        None, description="tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite in --out"
    )
    experiment: str = Field("qpacknet", min_length=1)
    registered_model: str | None = Field(
        None, description="registry name for the packed model; None: qpacknet-<scenario>"
    )
    register_models: bool = Field(True, description="register a model version after every task")
    log_candidates: bool = Field(True, description="one nested run per candidate")
    http_timeout_s: float = Field(10.0, gt=0.0, description="per request to a tracking server")
    http_retries: int = Field(2, ge=0, description="retries per request before giving up")


class InferenceConfig(_Strict):
    """Task inference without task ids (DESIGN.md §2 Inference; :mod:`qpacknet.recognise`).
    Which statistics each task keeps in the model file, computed at COMMIT from its training
    split, and which recogniser the run's headline ``task_inference_acc`` /
    ``class_incremental_acc`` use (results.json ``task_inference`` has every recogniser's).
    Changes only what is reported and kept, never what is learned."""

    recogniser: Literal["entropy", "input", "feature", "combined"] = Field(
        "combined",
        description="headline recogniser: entropy (lowest prediction entropy), input (Gaussian "
        "over the network input), feature (Mahalanobis on penultimate features), combined",
    )
    statistics: list[Literal["input", "feature"]] = Field(
        default_factory=lambda: ["input", "feature"],
        description="per-task recognition statistics kept in the model file (feature: "
        "4*(C*D + D*(D+1)/2) bytes per task, large for wide backbones; [] keeps none)",
    )
    feature_covariance: Literal["full", "diagonal"] = Field(
        "full",
        description="the feature statistics' pooled covariance: full (4*D*(D+1)/2 bytes per "
        "task) or diagonal (4*D bytes; recognises less well where features correlate)",
    )

    @model_validator(mode="after")
    def _check(self) -> InferenceConfig:
        if len(set(self.statistics)) != len(self.statistics):
            raise ValueError(f"statistics lists a kind twice: {self.statistics}")
        needs = {"input": {"input"}, "feature": {"feature"}, "combined": {"input", "feature"}}
        lacking = sorted(needs.get(self.recogniser, set()) - set(self.statistics))
        if lacking:
            raise ValueError(
                f"recogniser {self.recogniser!r} needs the {' and '.join(lacking)} statistics: "
                "add them to inference.statistics or choose another recogniser"
            )
        return self


class RunConfig(_Strict):
    """A whole scenario run."""

    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads; None = torch default")
    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig)
    net: NetConfig = Field(default_factory=NetConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    sharing: SharingConfig = Field(default_factory=SharingConfig)
    capacity: CapacityConfig = Field(default_factory=CapacityConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.capacity.when_full == "share" and self.sharing.max_fraction == 0:
            raise ValueError(
                "capacity.when_full=share with sharing.max_fraction=0 would share nothing once "
                "the words are full; raise sharing.max_fraction or choose grow or stop"
            )
        return self


PRESETS_PACKAGE = "qpacknet.presets"


def preset_names() -> list[str]:
    """Presets shipped inside the package (``qpacknet/presets/*.yaml``)."""
    root = resources.files(PRESETS_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of settings, not {type(data).__name__}")
    return data


def preset_dict(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    text = resources.files(PRESETS_PACKAGE).joinpath(f"{name}.yaml").read_text()
    return read_yaml(text, f"preset {name!r}")


def file_dict(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    return read_yaml(p.read_text(), f"config file {str(p)!r}")


def check_key(key: str) -> None:
    """Raise :class:`ConfigError` unless ``key`` (``a.b``) names a setting of :class:`RunConfig`,
    so a typo fails with the key in the message instead of being silently ignored."""
    parts = key.split(".")
    model: type[BaseModel] | None = RunConfig
    for i, part in enumerate(parts):
        fields = model.model_fields if model is not None else {}
        if part not in fields:
            prefix = ".".join(parts[:i]) or "the top level"
            raise ConfigError(
                f"unknown setting {key!r}: {prefix} has no key {part!r} "
                f"(known: {', '.join(sorted(fields))})"
            )
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None and i < len(parts) - 1:
            raise ConfigError(f"unknown setting {key!r}: {'.'.join(parts[: i + 1])} is a value")


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` to ``value`` in a settings mapping, in place (key checked first)."""
    check_key(key)
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.path=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    check_key(key)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"value of {key!r} is not valid YAML: {exc}") from exc
    set_key(data, key, value)


def error_lines(exc: ValidationError, unknown: str) -> list[str]:
    """One ``  dotted.key: message (got value)`` line per pydantic error; ``unknown`` is the
    message for keys the model does not have."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = unknown if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg} (got {err.get('input')!r})")
    return lines


def validate(data: dict[str, Any]) -> RunConfig:
    """Validate a settings mapping; errors name each offending dotted key."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = error_lines(exc, "unknown setting (remove it or check its spelling)")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    seed: int | None = None,
) -> RunConfig:
    """Build a :class:`RunConfig` from a preset or a file, then overrides, then ``seed``."""
    if preset is not None and config_file is not None:
        raise ConfigError("give either a preset or a config file, not both")
    if preset is not None:
        data = preset_dict(preset)
    elif config_file is not None:
        data = file_dict(config_file)
    else:
        data = {}
    data = copy.deepcopy(data)
    for assignment in overrides or []:
        apply_override(data, assignment)
    if seed is not None:
        data["seed"] = seed
    return validate(data)


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """Dotted-key view of a config (for logs and, later, MLflow params)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", cfg.model_dump())
    return out
