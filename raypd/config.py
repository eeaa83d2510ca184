"""raypd's one typed config schema: every default lives here.

Study files and `--set key=value` state only what differs; `from_dict` turns a plain dict
(from YAML or JSON) into the typed config and raises ValueError naming the key for an
unknown key, a value of the wrong type, or a value out of range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Range = tuple[float, float]
INPUT_NORMS = ("sample", "sample+scale", "global")  # train.input_norm


@dataclass(frozen=True)
class DataConfig:
    """What a dataset is: the ODE's size, the sampling ranges, the time grid and the solver
    tolerances. Two datasets with equal DataConfigs have identical rows."""

    n_actions: int = 1
    samples: int = 10_000
    seed: int = 42
    g_range: Range = (0.0, 3.0)
    mu_range: Range = (-10.0, 0.0)
    pi_diag_range: Range = (0.1, 3.0)
    pi_offdiag_range: Range = (-3.0, 0.0)
    gamma_diag_range: Range = (0.1, 3.0)
    gamma_offdiag_range: Range = (-3.0, 3.0)
    v0_range: Range = (-5.0, 5.0)
    m0_range: Range = (-2.0, 2.0)
    time_span: Range = (0.0, 200.0)
    time_points: int = 201
    # Dormand-Prince tolerances: the observed series then agrees with a DOP853 solution at
    # rtol 1e-10 to ~1e-5 of its scale for n=1 (tests/test_ode.py).
    rtol: float = 1e-8
    atol: float = 1e-10

    def validate(self) -> DataConfig:
        if not 1 <= self.n_actions <= 3:
            raise ValueError(f"n_actions must be 1, 2 or 3 (got {self.n_actions})")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1 (got {self.samples})")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (got {self.seed})")
        if self.seed >= 2**64:  # the key of each sample's Philox stream is (seed, sample_id)
            raise ValueError(f"seed must be < 2**64 (got {self.seed})")
        for name in RANGE_FIELDS:
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{name} must be two finite numbers LOW HIGH (got {lo} {hi})")
            if lo > hi:
                raise ValueError(f"{name} must have LOW <= HIGH (got {lo} {hi})")
        for name in ("pi_diag_range", "gamma_diag_range"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"{name} must be > 0: diagonals of Pi and Gamma are positive "
                                 f"(got {getattr(self, name)[0]})")
        t0, t1 = self.time_span
        if not (math.isfinite(t0) and math.isfinite(t1)) or t1 <= t0:
            raise ValueError(f"time_span must be T0 < T1, both finite (got {t0} {t1})")
        if self.time_points < 2:
            raise ValueError(f"time_points must be >= 2 (got {self.time_points})")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not (0 < value < 1):
                raise ValueError(f"{name} must be in (0, 1) (got {value})")
        return self

    def times(self) -> np.ndarray:
        return np.linspace(self.time_span[0], self.time_span[1], self.time_points)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of a draw: parameters then initial conditions (docs/science.md §2)."""
        n = self.n_actions
        diag = np.eye(n, dtype=bool).ravel()
        lo, hi = [], []
        for k in (0, 1):
            Pi = np.where(diag, self.pi_diag_range[k], self.pi_offdiag_range[k])
            Gamma = np.where(diag, self.gamma_diag_range[k], self.gamma_offdiag_range[k])
            parts = [np.full(n, self.g_range[k]), np.full(n, self.mu_range[k]), Pi, Gamma,
                     np.full(n, self.v0_range[k]), np.full(n, self.m0_range[k])]
            (lo if k == 0 else hi).append(np.concatenate(parts).astype(np.float64))
        return lo[0], hi[0]

    def fingerprint(self) -> str:
        """A short hash of the settings: names the dataset's folder."""
        blob = json.dumps(to_dict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def dataset_name(self) -> str:
        return f"n{self.n_actions}-k{self.samples}-s{self.seed}-{self.fingerprint()}"


RANGE_FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig) if f.name.endswith("_range"))


FAMILIES = ("cnn", "resnet")  # model.family (raypd.model)
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
NORMS = ("none", "batch", "layer")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "onecycle")

# Keys that belong to one value of another key (a family, an optimiser, a schedule): a study
# samples them only where that value is chosen (search.space: `when`).
OWNED_KEYS = {
    "model.filters": ("model.family", "cnn"),
    "model.kernel_sizes": ("model.family", "cnn"),
    "model.blocks": ("model.family", "resnet"),
    "model.width": ("model.family", "resnet"),
    "model.kernel": ("model.family", "resnet"),
    "model.dilation": ("model.family", "resnet"),
    "train.momentum": ("train.optimizer", "sgd"),
    "train.warmup": ("train.schedule", "onecycle"),
}


@dataclass(frozen=True)
class ModelConfig:
    """The model (raypd.model). family cnn, the notebook's: conv blocks (Conv1d 'same' ->
    activation -> MaxPool1d(2)), one per entry of filters. family resnet: a stem conv, then
    `blocks` residual blocks of two convs (the first half of `width` channels, the rest of
    2 x width; block i dilated by dilation**i), pooling between blocks. Both: global average
    pooling, dropout, hidden Linear + activation layers, a linear output layer."""

    family: str = "cnn"
    activation: str = "relu"
    norm: str = "none"  # after each conv: none, batch (BatchNorm1d), layer (GroupNorm(1, C))
    # family cnn
    filters: list[int] = dataclasses.field(default_factory=lambda: [64])
    kernel_sizes: list[int] = dataclasses.field(default_factory=lambda: [3])
    # family resnet
    blocks: int = 4
    width: int = 64
    kernel: int = 3
    dilation: int = 1
    # both
    hidden: list[int] = dataclasses.field(default_factory=lambda: [32])
    dropout: float = 0.3
    # n >= 2: predict as the mean over the n! relabellings of the actions (each prediction
    # relabelled back): in evaluation, raypd.predict and the served model alike
    average_relabellings: bool = False

    def validate(self) -> ModelConfig:
        for key, allowed in (("family", FAMILIES), ("activation", ACTIVATIONS), ("norm", NORMS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key} must be one of {', '.join(allowed)} (got {getattr(self, key)!r})")
        if not self.filters:
            raise ValueError("model.filters must list at least one conv layer")
        if len(self.filters) != len(self.kernel_sizes):
            raise ValueError(f"model.filters and model.kernel_sizes must have the same length "
                             f"(got {len(self.filters)} and {len(self.kernel_sizes)})")
        for name in ("filters", "kernel_sizes", "hidden"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"model.{name} must hold integers >= 1 (got {getattr(self, name)})")
        for name in ("blocks", "width", "kernel", "dilation"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1) (got {self.dropout})")
        return self


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and scaling. num_workers 0 runs the loop in the calling process (Ray
    Train's local mode); use_gpu None means: use GPUs when the cluster has them."""

    lr: float = 0.002  # the peak with schedule onecycle
    optimizer: str = "adam"  # adam, adamw (decoupled weight decay), sgd (with momentum)
    momentum: float = 0.9  # optimizer sgd
    # the learning rate over the epochs (stepped once an epoch, over train.epochs): none,
    # cosine (annealed to 0), onecycle (rises over the first `warmup` share, then anneals)
    schedule: str = "none"
    warmup: float = 0.3  # schedule onecycle
    epochs: int = 200
    batch_size: int = 32
    patience: int = 20
    weight_decay: float = 0.0
    # n >= 2: train on each sample under a random relabelling of its actions (its channels
    # and targets permuted together; a new draw every epoch)
    relabel: bool = False
    grad_clip: float = 1.0
    num_workers: int = 1
    use_gpu: bool | None = None
    gpus_per_worker: float = 1.0  # fractional (0.5: two workers share a GPU) when use_gpu
    seed: int = 0
    split_seed: int = 0
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    # the share of the validation split set apart as the calibration split: the model-only and
    # refined intervals are calibrated on it, and no choice is made on it (early stopping,
    # ASHA and the best trial use the rest of the validation split)
    calibration: float = 0.5
    # how series become model inputs (raypd.dataset.apply_input_norm): "sample" (the notebook's,
    # per-sample std), "sample+scale" (plus the per-sample scales as inputs), "global"
    input_norm: str = "sample"
    # on a CUDA device with one process per trial (num_workers 0 or 1): replay each full
    # batch's step as one CUDA graph (raypd.train.make_train_step); ignored on CPUs
    cuda_graph: bool = False
    # where training reads the series: false holds the train and val splits in memory (one
    # float32 copy per node, in Ray's object store), true streams the training split from the
    # dataset's files through Ray Data every epoch; null: stream what exceeds 1/8 of a node's
    # object store (raypd.train.held_splits)
    streaming: bool | None = None
    # streaming: rows of the local shuffle buffer the training split is drawn from (the file
    # order is shuffled each epoch too)
    shuffle_buffer: int = 10000

    def validate(self) -> TrainConfig:
        checks = [
            (self.lr > 0, f"train.lr must be > 0 (got {self.lr})"),
            (self.optimizer in OPTIMIZERS,
             f"train.optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})"),
            (0 <= self.momentum < 1, f"train.momentum must be in [0, 1) (got {self.momentum})"),
            (self.schedule in SCHEDULES,
             f"train.schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})"),
            (0 < self.warmup < 1, f"train.warmup must be a share in (0, 1) (got {self.warmup})"),
            (self.epochs >= 1, f"train.epochs must be >= 1 (got {self.epochs})"),
            (self.batch_size >= 1, f"train.batch_size must be >= 1 (got {self.batch_size})"),
            (self.patience >= 1, f"train.patience must be >= 1 (got {self.patience})"),
            (self.weight_decay >= 0, f"train.weight_decay must be >= 0 (got {self.weight_decay})"),
            (self.grad_clip > 0, f"train.grad_clip must be > 0 (got {self.grad_clip})"),
            (self.num_workers >= 0, f"train.num_workers must be >= 0 (got {self.num_workers})"),
            (0 < self.gpus_per_worker and (self.gpus_per_worker <= 1 or float(self.gpus_per_worker).is_integer()),
             f"train.gpus_per_worker must be a fraction in (0, 1] or a whole number (got {self.gpus_per_worker})"),
            (self.seed >= 0 and self.split_seed >= 0, "train.seed and train.split_seed must be >= 0"),
            (self.shuffle_buffer >= 1, f"train.shuffle_buffer must be >= 1 row (got {self.shuffle_buffer})"),
            (self.input_norm in INPUT_NORMS,
             f"train.input_norm must be one of {', '.join(INPUT_NORMS)} (got {self.input_norm!r})"),
            (0 < self.calibration < 1, f"train.calibration must be a share in (0, 1) (got {self.calibration})"),
            (all(f > 0 for f in self.split) and abs(sum(self.split) - 1) < 1e-9,
             f"train.split must be three fractions > 0 that add up to 1 (got {list(self.split)})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


SPACE_KINDS = {"loguniform": 2, "uniform": 2, "int": (2, 3), "choice": None}
DERIVE_KINDS = ("repeat", "list")


@dataclass(frozen=True)
class SearchConfig:
    """A study: the searcher, the scheduler and the search space.

    space: NAME -> {loguniform: [lo, hi]} | {uniform: [lo, hi]} | {int: [lo, hi(, step)]} |
    {choice: [v1, v2, ...]}. A NAME with a dot (train.lr) sets that config key; a plain
    NAME is a variable for `derive`: KEY -> {repeat: [value, VARIABLE]} (a list of VARIABLE
    copies of value) or {list: [VARIABLE or value, ...]}.
    """

    searcher: str = "optuna"
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 3
    num_samples: int = 10
    max_concurrent: int = 0  # 0: as many as the cluster's CPUs and GPUs hold
    max_failures: int = 2  # retries of a failed trial (from its last checkpoint)
    metric: str = "val_loss"
    mode: str = "min"
    seed: int = 0
    space: dict[str, dict] = dataclasses.field(default_factory=dict)
    derive: dict[str, dict] = dataclasses.field(default_factory=dict)

    def validate(self) -> SearchConfig:
        choices = {"searcher": ("optuna", "hyperopt"), "scheduler": ("asha", "fifo"), "mode": ("min", "max"),
                   "metric": ("val_loss", "train_loss")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"search.{key} must be one of {', '.join(allowed)} (got {getattr(self, key)!r})")
        for key, low in (("grace_period", 1), ("reduction_factor", 2), ("num_samples", 1), ("max_concurrent", 0),
                         ("max_failures", 0), ("seed", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"search.{key} must be >= {low} (got {getattr(self, key)})")
        for section, names in (("space", self.space), ("derive", self.derive)):
            for name in names:
                if not isinstance(name, str):
                    raise ValueError(f"search.{section}: names must be text, a config key or a variable "
                                     f"(got {name!r})")
        for name, spec in self.space.items():
            where = f"search.space.{name}"
            kinds = [k for k in spec if k != "when"] if isinstance(spec, dict) else []
            if len(kinds) != 1 or kinds[0] not in SPACE_KINDS:
                raise ValueError(f"{where} must be one of {{loguniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
                                 f"{{int: [lo, hi, step]}}, {{choice: [...]}}, with an optional "
                                 f"when: {{KEY: VALUE}} (got {spec!r})")
            kind, args, _ = space_entry(spec)
            sizes = SPACE_KINDS[kind]
            if not isinstance(args, list) or not args or (
                    sizes is not None and len(args) not in (sizes if isinstance(sizes, tuple) else (sizes,))):
                raise ValueError(f"{where}: {kind} needs a list of {sizes or 'values'} (got {args!r})")
            if kind != "choice":
                if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                    raise ValueError(f"{where}: {kind} bounds must be numbers (got {args!r})")
                if args[0] > args[1] or (kind == "loguniform" and args[0] <= 0):
                    raise ValueError(f"{where}: {kind} needs 0 < lo <= hi for loguniform, lo <= hi otherwise "
                                     f"(got {args!r})")
                if kind == "int" and not all(isinstance(a, int) for a in args):
                    raise ValueError(f"{where}: int bounds and step must be integers (got {args!r})")
                if kind == "int" and len(args) == 3 and args[2] < 1:
                    raise ValueError(f"{where}: int step must be >= 1 (got {args!r})")
            elif not all(v is None or isinstance(v, (bool, int, float, str)) for v in args):
                raise ValueError(f"{where}: choice values must be numbers, text, true/false or null "
                                 f"(got {args!r}); make a list from a choice with search.derive")
        for name, spec in self.space.items():
            self.check_when(name, spec)
        variables = {n for n in self.space if "." not in n}
        for key, spec in self.derive.items():
            where = f"search.derive.{key}"
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DERIVE_KINDS:
                raise ValueError(f"{where} must be {{repeat: [value, VARIABLE]}} or {{list: [...]}} (got {spec!r})")
            kind, args = next(iter(spec.items()))
            if not isinstance(args, list) or (kind == "repeat" and (len(args) != 2 or args[1] not in variables)):
                raise ValueError(f"{where}: repeat needs [value, VARIABLE] with VARIABLE one of the space's "
                                 f"plain names ({', '.join(sorted(variables)) or 'none'}) (got {args!r})")
        return self


    def check_when(self, name: str, spec: dict) -> None:
        """A condition names one choice of the space that has no condition itself, and values
        among its choices."""
        when = spec.get("when")
        if when is None:
            return
        where = f"search.space.{name}.when"
        unconditional = [n for n, s in self.space.items() if "when" not in s and next(iter(s)) == "choice"]
        if not isinstance(when, dict) or len(when) != 1:
            raise ValueError(f"{where} must be {{KEY: VALUE}} or {{KEY: [VALUE, ...]}} with KEY a choice of the "
                             f"space ({', '.join(unconditional) or 'the space has none'}) (got {when!r})")
        (key, values), = when.items()
        if key not in unconditional:
            raise ValueError(f"{where}: {key!r} is not a choice of the space without a condition of its own "
                             f"(conditions may name: {', '.join(unconditional) or 'none: the space has no choice'})")
        choices = space_entry(self.space[key])[1]
        for value in values if isinstance(values, list) else [values]:
            if value not in choices:
                raise ValueError(f"{where}: {key} is never {value!r} (its choices: "
                                 f"{', '.join(map(str, choices))})")


def space_entry(spec: dict) -> tuple[str, list, dict | None]:
    """A search.space entry's kind, arguments and condition (`when`, or None)."""
    kind = next(k for k in spec if k != "when")
    return kind, spec[kind], spec.get("when")


def derive_variables(spec: dict, space: dict) -> list[str]:
    """The space's variables a search.derive entry names (repeat's count, list's items)."""
    kind, args = next(iter(spec.items()))
    return [args[1]] if kind == "repeat" else [a for a in args if isinstance(a, str) and a in space]


def condition_holds(when: dict | None, params: dict) -> bool:
    """Whether a space entry with condition `when` is sampled, given the values sampled so far."""
    if when is None:
        return True
    (key, values), = when.items()
    return key in params and params[key] in (values if isinstance(values, list) else [values])


@dataclass(frozen=True)
class Config:
    """One run or study: what data, which model, how to train, how to search."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)

    def validate(self) -> Config:
        try:
            self.data.validate()
        except ValueError as exc:
            raise ValueError(f"data.{exc}") from None
        self.model.validate()
        self.train.validate()
        self.search.validate()
        check_split(self.data.samples, self.train.split, "data.samples", self.train.calibration)
        return self


def check_searched_keys(config: Config) -> None:
    """Every dotted name of the space is a config key, and a key that belongs to one family
    (optimiser, schedule: OWNED_KEYS) is searched only where that value is: under a condition
    on it when the study searches its owner, else in a study that fixes the owner to it.
    (A study's check, raypd.tune.check_space: raypd.train ignores a config's search section.)"""
    search = config.search
    hints = typing.get_type_hints(Config)
    sections = {name: {f.name for f in dataclasses.fields(hints[name])} for name in ("data", "model", "train")}
    for key in [*search.space, *search.derive]:
        section, _, field = key.partition(".")
        where = f"search.{'space' if key in search.space else 'derive'}.{key}"
        if not field:
            continue  # a variable
        if field not in sections.get(section, ()):
            known = ", ".join(sorted(sections.get(section, ()))) if section in sections else ", ".join(sections)
            raise ValueError(f"{where}: no config key {key} ({'its keys' if section in sections else 'sections'}: "
                             f"{known})")
        if key not in OWNED_KEYS:
            continue
        owner, value = OWNED_KEYS[key]
        if key in search.space:
            conditions = [search.space[key].get("when")]
        else:  # a derived key is set where the variables it names were sampled
            names = derive_variables(search.derive[key], search.space)
            conditions = [search.space[n].get("when") for n in names] or [None]
        on_owner = [c for c in conditions if c and owner in c]
        if owner in search.space:
            if not on_owner or any((w[owner] if isinstance(w[owner], list) else [w[owner]]) != [value]
                                   for w in on_owner):
                raise ValueError(f"{where} belongs to {owner} {value}: the study searches {owner}, so "
                                 f"{'give it' if key in search.space else 'derive it from a variable with'} "
                                 f"when: {{{owner}: {value}}}")
        else:
            section_name, field_name = owner.split(".")
            fixed = getattr(getattr(config, section_name), field_name)
            if fixed != value:
                raise ValueError(f"{where} belongs to {owner} {value}, and the study's {owner} is {fixed} "
                                 f"(set {owner}: {value}, or search {owner})")


def dataset_dir(config: Config, root: Path) -> Path:
    """Where a study or a training run under ROOT keeps its dataset: ROOT/data/<dataset_name>."""
    return root / "data" / config.data.dataset_name()


def split_sizes(samples: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """How many of `samples` samples the train, val and test splits get."""
    n_train, n_val = int(round(fractions[0] * samples)), int(round(fractions[1] * samples))
    return n_train, n_val, samples - n_train - n_val


def split_rows(samples: int, fractions: tuple[float, float, float], calibration: float) -> dict[str, int]:
    """How many of `samples` samples each split gets: train, val (model selection), calib (the
    intervals' calibration: `calibration` of the validation share) and test."""
    n_train, n_val, n_test = split_sizes(samples, fractions)
    n_calib = int(round(calibration * n_val))
    return {"train": n_train, "val": n_val - n_calib, "calib": n_calib, "test": n_test}


def check_split(samples: int, fractions: tuple[float, float, float], what: str, calibration: float = 0.5) -> None:
    """Every split needs a sample: the loop divides by the train and val sizes, the metrics by
    the test size, the calibration by its own."""
    sizes = split_rows(samples, fractions, calibration)
    empty = [name for name, size in sizes.items() if size < 1]
    if empty:
        raise ValueError(f"train.split {list(fractions)} (calibration {calibration:g} of val) of {what} {samples} "
                         f"leaves the {' and '.join(empty)} split empty "
                         f"({'/'.join(f'{k} {v}' for k, v in sizes.items())}); each split needs at least one sample")


def apply_sets(values: dict, assignments: list[str]) -> dict:
    """`--set a.b=value` on top of `values`; a value parses as YAML (`[64,128]`, `1e-3`,
    `{int: [1, 4]}`) and replaces what was at a.b."""
    import yaml

    out = merge({}, values)
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r} must look like key=value (e.g. train.lr=0.01)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            reason = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]  # a ReaderError has none
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({reason})") from None
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 as a string
                value = float(value)
            except ValueError:
                pass
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            if not isinstance(node.get(part, {}), dict):
                raise ValueError(f"--set {item!r}: {part} is not a section")
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def merge(base: dict, override: dict) -> dict:
    """Nested dict merge (copies): override's leaves win."""
    out = {k: merge(v, {}) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | None = None, sets: list[str] | tuple = ()) -> Config:
    """Defaults <- YAML file at `path` <- `--set` assignments, validated."""
    import yaml

    values: dict = {}
    if path is not None:
        try:
            with open(path) as fh:
                values = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ValueError(f"config file {path} is a folder, not a YAML file") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        except UnicodeDecodeError:
            raise ValueError(f"config file {path} is not UTF-8 text (a YAML file is expected)") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must be a mapping of sections (data, model, train)")
    values = apply_sets(values, list(sets))
    return from_dict(Config, values).validate()


# --------------------------------------------------------------------------- dict <-> config


def to_dict(config) -> dict:
    """A JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def with_defaults(cls, values) -> dict | None:
    """`values` saved by an earlier raypd (a study.json, a checkpoint's model_config) with the
    keys a newer raypd added at their defaults, as a dict; None where they are not a `cls` of
    this raypd."""
    try:
        return to_dict(from_dict(cls, values))
    except (ValueError, TypeError):
        return None


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value, hint, key: str):
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        raise ValueError(f"{key} must be a list of {len(args)} values "
                         f"[{', '.join(_type_name(a) for a in args)}] (got {value!r})")
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(f"{key} must be a mapping (got {value!r})")
    elif origin is list:
        (arg,) = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
        raise ValueError(f"{key} must be a list of {_type_name(arg)} (got {value!r})")
    elif origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                pass
    elif dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")
    else:  # pragma: no cover - a field type this function does not know is our bug
        raise AssertionError(f"unsupported config type {hint!r} for {key}")
    raise ValueError(f"{key} must be {_type_name(hint)} (got {value!r})")


def from_dict(cls, values, prefix: str = ""):
    """Build dataclass `cls` from `values`, filling defaults; unknown keys are errors."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys to values "
                         f"(got {values!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ValueError(f"unknown key {prefix}{unknown[0]} (allowed: {', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in values.items()}
    return cls(**kwargs)
