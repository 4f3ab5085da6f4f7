"""KerasTuner over the hyperparameters of any method.

The search space is declared in one place, `DEFAULT_SPACES`, as entries of
the form used by `--tune_space`:

    name=float:LOW:HIGH[:log]   name=int:LOW:HIGH   name=choice:A,B,C

where `name` is an `ExperimentConfig` field (so a trial is just a config,
and the best one is written back as a flagfile `pipelines.train` accepts).
The objective is validation accuracy on the clean meta set; the test set is
never read while tuning.
"""

import csv
import dataclasses
import io
import os
import typing
from typing import Dict, List, Sequence

import keras
import keras_tuner as kt

from lfm_tf import config as config_lib
from lfm_tf import train_lib
from lfm_tf.methods import factory

OBJECTIVE = kt.Objective("val_accuracy", direction="max")
TUNERS = ("random", "hyperband", "bayesian")

_COMMON = (
    "w1_learning_rate=float:0.01:0.3:log",
    "weight_decay=float:1e-5:1e-3:log",
)
DEFAULT_SPACES = {
    "erm": _COMMON,
    "focal": _COMMON + ("focal_gamma=float:0.5:3.0",),
    "class_balanced": _COMMON + ("class_balanced_beta=choice:0.99,0.999,0.9999",),
    "l2rw": _COMMON,
    "mwnet": _COMMON + (
        "meta_net_learning_rate=float:1e-4:1e-2:log",
        "weight_normalization=choice:none,batch_mean",
    ),
    "dbl": _COMMON + ("dbl_mu=float:1e-3:1e-1:log",),
    "penalty": (
        "penalty_learner_learning_rate=float:1e-5:1e-3:log",
        "penalty_weight_learning_rate=float:0.3:10:log",
    ),
    "lrw_easy": _COMMON + ("lrw_delta=float:0.05:0.3",),
    "lrw_random": _COMMON + ("lrw_delta=float:0.05:0.3",),
    "lrw_hard": _COMMON + ("lrw_delta=float:0.05:0.3",),
    "molere": _COMMON + (
        "lrw_delta=float:0.05:0.3",
        "molere_splitter_learning_rate=float:1e-4:1e-2:log",
    ),
    "lfm": _COMMON + (
        "w2_learning_rate=float:0.01:0.3:log",
        "example_weight_learning_rate=float:1e-3:1e-1:log",
        "encoder_learning_rate=float:1e-4:1e-2:log",
        "weighting_learning_rate=float:1e-4:1e-2:log",
        "hypergradient=choice:exact,first_order",
        "encoder=choice:small_cnn,shared",
        "similarity=choice:dot,cosine,l2",
        "weight_normalization=choice:none,batch_mean",
        "num_meta_per_class=int:5:15",
    ),
}


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One tunable config field."""

    name: str
    kind: str  # float | int | choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    values: tuple = ()

    def declare(self, hp):
        """Registers the dimension with KerasTuner; returns the value."""
        if self.kind == "float":
            return hp.Float(self.name, self.low, self.high,
                            sampling="log" if self.log else "linear")
        if self.kind == "int":
            return hp.Int(self.name, int(self.low), int(self.high))
        return hp.Choice(self.name, list(self.values))

    def describe(self):
        if self.kind == "choice":
            return f"{self.name}: one of {list(self.values)}"
        scale = " (log)" if self.log else ""
        return f"{self.name}: {self.kind} in [{self.low}, {self.high}]{scale}"


def _field_types():
    types = {}
    for group in dataclasses.fields(config_lib.ExperimentConfig):
        for field in dataclasses.fields(group.default_factory):
            args = [a for a in typing.get_args(field.type)
                    if a is not type(None)]
            types[field.name] = args[0] if args else field.type
    return types


def parse_space(entries: Sequence[str], base=None) -> List[Dimension]:
    """Parses `name=kind:...` entries, checking each against the config.

    Args:
      entries: search-space entries.
      base: the `ExperimentConfig` trials start from; every choice and both
        bounds must make a valid config with it (default: the defaults).

    Raises:
      ValueError: naming the entry, what was expected and the fix.
    """
    types = _field_types()
    dimensions = []
    for entry in entries:
        name, _, spec = entry.partition("=")
        kind, _, rest = spec.partition(":")
        if name not in types:
            raise ValueError(
                f"Search-space entry {entry!r} names no config field "
                f"{name!r}; expected one of the pipelines.train flags."
            )
        try:
            if kind in ("float", "int"):
                parts = rest.split(":")
                low, high = float(parts[0]), float(parts[1])
                log = parts[2:] == ["log"]
                if parts[2:] not in ([], ["log"]) or not low < high or (
                        log and low <= 0):
                    raise ValueError("bad bounds")
                dimension = Dimension(name, kind, low, high, log)
            elif kind == "choice":
                values = tuple(types[name](v) for v in rest.split(","))
                dimension = Dimension(name, "choice", values=values)
            else:
                raise ValueError("bad kind")
        except (ValueError, IndexError) as error:
            raise ValueError(
                f"Cannot parse search-space entry {entry!r} ({error}); "
                "expected name=float:LOW:HIGH[:log] with 0 < LOW < HIGH for "
                "log, name=int:LOW:HIGH, or name=choice:A,B,C."
            ) from None
        base = base or config_lib.ExperimentConfig()
        for value in _corners(dimension):
            base.replace(**{name: value}).validate()
        dimensions.append(dimension)
    return dimensions


def _corners(dimension):
    if dimension.kind == "choice":
        return dimension.values
    cast = int if dimension.kind == "int" else float
    return (cast(dimension.low), cast(dimension.high))


def merge_space(base, overrides: Sequence[str]) -> List[Dimension]:
    """The default space of `base`'s method, `overrides` replacing names.

    Raises:
      ValueError: an architecture-search method (the tuner drives
        `pipelines.train`, whose runs end in a test accuracy).
    """
    if base.method.method not in DEFAULT_SPACES:
        raise ValueError(
            f"Received method={base.method.method!r}; the tuner searches the "
            f"training methods {sorted(DEFAULT_SPACES)}. Tune a searched "
            "cell by training it: --genotype=<search>/genotype.json with a "
            "training method."
        )
    defaults = {
        d.name: d
        for d in parse_space(DEFAULT_SPACES[base.method.method], base)
    }
    for dimension in parse_space(overrides, base):
        defaults[dimension.name] = dimension
    return list(defaults.values())


class LfmHyperModel(kt.HyperModel):
    """Builds and trains any method for one set of hyperparameters.

    Args:
      base_config: `ExperimentConfig` every trial starts from.
      space: list of `Dimension`.
    """

    def __init__(self, base_config, space, **kwargs):
        super().__init__(**kwargs)
        self.base_config = base_config
        self.space = space
        self._data = {}

    def config_for(self, hp):
        """The trial's config: base values overridden by the hp values."""
        values = {d.name: d.declare(hp) for d in self.space}
        return self.base_config.replace(**values).validate()

    def data_for(self, config):
        """Data per distinct `DataConfig` (a trial may change the meta set)."""
        if config.data not in self._data:
            self._data[config.data] = train_lib.prepare_data(config)
        return self._data[config.data]

    def build(self, hp):
        config = self.config_for(hp)
        keras.utils.set_random_seed(config.data.seed)
        model = factory.build_method(config, self.data_for(config)["facts"])
        return factory.compile_method(model, config)

    def fit(self, hp, model, *args, callbacks=None, **kwargs):
        del args, kwargs
        config = self.config_for(hp)
        data = self.data_for(config)
        return model.fit(
            data["train"], validation_data=data["validation"],
            epochs=config.train.epochs,
            steps_per_epoch=config.train.steps_per_epoch,
            callbacks=callbacks, verbose=0, shuffle=False,
        )


def make_tuner(kind, hypermodel, directory, *, max_trials,
               executions_per_trial=1, seed=0, max_epochs=None):
    """A resumable tuner (`overwrite=False`) of the given kind."""
    common = dict(
        objective=OBJECTIVE, directory=directory, project_name="search",
        overwrite=False, seed=seed, executions_per_trial=executions_per_trial,
    )
    if kind == "random":
        return kt.RandomSearch(hypermodel, max_trials=max_trials, **common)
    if kind == "bayesian":
        return kt.BayesianOptimization(hypermodel, max_trials=max_trials,
                                       **common)
    if kind == "hyperband":
        return kt.Hyperband(hypermodel, max_epochs=max_epochs or 3,
                            **common)
    raise ValueError(f"Received tuner={kind!r}; expected one of {TUNERS}.")


def results_rows(tuner) -> List[Dict]:
    """One row per finished trial: id, objective, hyperparameter values."""
    rows = []
    for trial in tuner.oracle.trials.values():
        if trial.status != "COMPLETED":
            continue
        rows.append({"trial": trial.trial_id, "val_accuracy": trial.score,
                     **trial.hyperparameters.values})
    return sorted(rows, key=lambda r: -(r["val_accuracy"] or 0.0))


def results_markdown(rows):
    """The rows as a Markdown table, best first."""
    if not rows:
        return "No finished trials.\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |",
             "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(
            f"{row.get(k):.4g}" if isinstance(row.get(k), float)
            else str(row.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def results_csv(rows):
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def to_flagfile(config, header=""):
    """Every config field as a flag line; `pipelines.train` reads it as is."""
    lines = [f"# {line}" for line in header.splitlines()]
    for group in config.groups():
        for field in dataclasses.fields(group):
            value = getattr(group, field.name)
            if value is None:
                continue
            if isinstance(value, bool):
                lines.append(f"--{'' if value else 'no'}{field.name}")
            else:
                lines.append(f"--{field.name}={value}")
    return "\n".join(lines) + "\n"


def best_config(tuner, hypermodel):
    """The config of the best finished trial."""
    best = tuner.get_best_hyperparameters(1)
    if not best:
        raise ValueError("No trial has finished; nothing to pick from.")
    return hypermodel.config_for(best[0])


def results_dir(workdir):
    return os.path.join(workdir, "results")
