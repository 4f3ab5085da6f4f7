"""KerasTuner over the hyperparameters of any method.

The search space is declared in one place, `DEFAULT_SPACES`, as entries of
the form used by `--tune_space`:

    name=float:LOW:HIGH[:log]   name=int:LOW:HIGH   name=choice:A,B,C

where `name` is an `ExperimentConfig` field (so a trial is just a config,
and the best one is written back as a flagfile `pipelines.train` accepts).
`merge_space` refuses a space before the first trial unless every value
fits its field (type, `config.CHOICES`, bools as true/false/1/0, whole
`int` bounds, training methods only) and every combination of choices and
bounds validates.
The objective is validation accuracy on the clean meta set; the test set is
never read while tuning.
"""

import csv
import dataclasses
import io
import itertools
import math
import os
import typing
from typing import Dict, List, Sequence

import keras
import keras_tuner as kt
from absl import logging

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


_BOOLS = {"true": True, "1": True, "false": False, "0": False}
_FORMS = ("expected name=float:LOW:HIGH[:log] with 0 < LOW < HIGH for log, "
          "name=int:LOW:HIGH, or name=choice:A,B,C")
# Above this many corner combinations the space is checked one dimension at
# a time (a trial that still fails is recorded as failed by KerasTuner).
_MAX_COMBINATIONS = 20000


def _parse_choice(entry, name, kind, text):
    """One `choice:` value as its field's type, refused unless allowed.

    Raises:
      ValueError: naming the entry, the value and what is allowed.
    """
    text = text.strip()

    def refuse(allowed):
        raise ValueError(
            f"Search-space entry {entry!r}: {name}={text!r} is not allowed; "
            f"expected {allowed}. Fix the value in --tune_space.")

    if kind is bool:
        if text.lower() not in _BOOLS:
            refuse("a bool: true, false, 1 or 0")
        return _BOOLS[text.lower()]
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            refuse(f"a number of the field's type {kind.__name__}")
    if not text:
        refuse("a non-empty value")
    choices = config_lib.CHOICES.get(name)
    if choices is not None and text not in choices:
        refuse(f"one of {list(choices)}")
    if name == "method" and text not in DEFAULT_SPACES:
        refuse(f"a training method, one of {sorted(DEFAULT_SPACES)} (the "
               "tuner trains classifiers; tune a searched cell by training "
               "it with --genotype)")
    return text


def _parse_bounds(entry, name, kind, field_type, rest):
    """(low, high, log) of a `float:` or `int:` entry.

    Raises:
      ValueError: the field is not of that numeric type, or the bounds are
        malformed, reversed, fractional for int, or not positive for log.
    """
    if field_type is not (int if kind == "int" else float):
        fix = {int: f"{name}=int:LOW:HIGH", float: f"{name}=float:LOW:HIGH"
               }.get(field_type, f"{name}=choice:A,B")
        type_name = field_type.__name__
        article = "an" if type_name[0] in "aeiou" else "a"
        raise ValueError(
            f"Search-space entry {entry!r}: {name} is {article} {type_name} "
            f"field, so {kind}: ranges do not fit it; expected {fix}.")
    parts = rest.split(":")
    try:
        low, high = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        raise ValueError(
            f"Cannot parse search-space entry {entry!r} (bounds); "
            f"{_FORMS}.") from None
    log = parts[2:] == ["log"]
    if parts[2:] not in ([], ["log"]) or not low < high or (log and low <= 0):
        raise ValueError(
            f"Cannot parse search-space entry {entry!r} (bad bounds); "
            f"{_FORMS}.")
    if kind == "int":
        if not (low.is_integer() and high.is_integer()):
            raise ValueError(
                f"Search-space entry {entry!r}: {name} is an int field but "
                f"the bounds {parts[0]}:{parts[1]} are fractional; expected "
                f"whole numbers, e.g. {name}=int:{int(low)}:"
                f"{max(int(low) + 1, int(high))}.")
        low, high = int(low), int(high)
    return low, high, log


def parse_space(entries: Sequence[str], base=None) -> List[Dimension]:
    """Parses `name=kind:...` entries, checking each against the config.

    Args:
      entries: search-space entries.
      base: the `ExperimentConfig` trials start from; every choice and both
        bounds must make a valid config with it (default: the defaults).

    Raises:
      ValueError: naming the entry, the value, what was expected and the
        fix.
    """
    types = _field_types()
    base = base or config_lib.ExperimentConfig()
    dimensions = []
    for entry in entries:
        name, _, spec = entry.partition("=")
        kind, _, rest = spec.partition(":")
        if name not in types:
            raise ValueError(
                f"Search-space entry {entry!r} names no config field "
                f"{name!r}; expected one of the pipelines.train flags."
            )
        if kind in ("float", "int"):
            low, high, log = _parse_bounds(entry, name, kind, types[name],
                                           rest)
            dimension = Dimension(name, kind, low, high, log)
        elif kind == "choice":
            values = tuple(_parse_choice(entry, name, types[name], v)
                           for v in rest.split(","))
            if len(set(values)) < len(values):
                raise ValueError(
                    f"Search-space entry {entry!r} repeats a value; expected "
                    "distinct choices.")
            dimension = Dimension(name, "choice", values=values)
        else:
            raise ValueError(
                f"Cannot parse search-space entry {entry!r} (kind "
                f"{kind!r}); {_FORMS}.")
        for value in _corners(dimension):
            try:
                base.replace(**{name: value}).validate()
            except ValueError as error:
                raise ValueError(
                    f"Search-space entry {entry!r}: {name}={value!r} makes "
                    f"an invalid config: {error}") from None
        dimensions.append(dimension)
    return dimensions


def _corners(dimension):
    if dimension.kind == "choice":
        return dimension.values
    cast = int if dimension.kind == "int" else float
    return (cast(dimension.low), cast(dimension.high))


def _invalid(base, values):
    """The validation error of `base` with `values`, or None."""
    try:
        base.replace(**values).validate()
    except ValueError as error:
        return error
    return None


def check_space(base, dimensions: Sequence[Dimension]):
    """Refuses a space in which some trial could not run, before trial 1.

    Validates a config for every combination of choice values and bounds
    (each dimension's corners); a failing combination is reduced to the
    hyperparameters that cause it.

    Raises:
      ValueError: naming those hyperparameters, their values and why.
    """
    grid = [[(d.name, v) for v in _corners(d)] for d in dimensions]
    if math.prod(len(g) for g in grid) > _MAX_COMBINATIONS:
        logging.warning(
            "The search space has more than %d corner combinations; each "
            "dimension was checked alone.", _MAX_COMBINATIONS)
        return
    for combination in itertools.product(*grid):
        values = dict(combination)
        if _invalid(base, values) is None:
            continue
        # Drop every hyperparameter the failure does not need.
        for name in list(values):
            fewer = {k: v for k, v in values.items() if k != name}
            if _invalid(base, fewer) is not None:
                values = fewer
        shown = " with ".join(f"{k}={v!r}" for k, v in values.items())
        raise ValueError(
            f"The search space contains trials that cannot run: {shown} "
            f"gives: {_invalid(base, values)} Narrow the --tune_space "
            f"entries of {sorted(values)} so that every combination is "
            "valid.")


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
    space = list(defaults.values())
    check_space(base, space)
    return space


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
