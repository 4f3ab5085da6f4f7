"""One absl flag per config field, default None, overriding only when set.

Defaults live once, in `lfm_tf.config`; a flag that is not given leaves the
dataclass default in place, so `config.json` always shows what really ran.
"""

import contextlib
import dataclasses
import typing

from absl import flags
from absl import logging

from lfm_tf import config as config_lib

FLAGS = flags.FLAGS


def _base_type(annotation):
    """int for Optional[int], etc."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _group_fields():
    for group in dataclasses.fields(config_lib.ExperimentConfig):
        for field in dataclasses.fields(group.default_factory):
            yield group.name, field


def define_flags(flag_values=FLAGS):
    """Defines `--workdir` plus one flag per config field (idempotent)."""
    if "workdir" in flag_values:
        return
    flags.DEFINE_string(
        "workdir", None, "Run directory: config.json, splits.npz, "
        "checkpoints, logs, metrics.json, the SavedModel.",
        flag_values=flag_values,
    )
    for group, field in _group_fields():
        help_text = f"[{group}] default: {field.default!r}."
        choices = config_lib.CHOICES.get(field.name)
        if choices:
            # absl refuses other values at parse time, naming the flag and
            # the choices, and --helpfull lists them.
            flags.DEFINE_enum(field.name, None, list(choices), help_text,
                              flag_values=flag_values)
            continue
        define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                  float: flags.DEFINE_float}.get(_base_type(field.type),
                                                 flags.DEFINE_string)
        define(field.name, None, help_text, flag_values=flag_values)


def define_tune_flags(flag_values=FLAGS):
    """The flags of `pipelines.tune` beyond the config fields (idempotent)."""
    if "tuner" in flag_values:
        return
    from lfm_tf import tuning  # pylint: disable=g-import-not-at-top

    flags.DEFINE_enum("tuner", "random", list(tuning.TUNERS),
                      "Search strategy.", flag_values=flag_values)
    flags.DEFINE_integer("max_trials", 4, "Trials (random / bayesian).",
                         flag_values=flag_values)
    flags.DEFINE_integer("executions_per_trial", 1,
                         "Fits per trial, averaged.", flag_values=flag_values)
    flags.DEFINE_integer(
        "early_stopping_patience", 2,
        "Stop a trial after this many epochs without a better val_accuracy; "
        "0 disables.", flag_values=flag_values)
    flags.DEFINE_multi_string(
        "tune_space", [],
        "Extra or replacing search-space entries: name=float:LOW:HIGH[:log],"
        " name=int:LOW:HIGH or name=choice:A,B,C (name: any config flag).",
        flag_values=flag_values)
    flags.DEFINE_bool("print_space", False,
                      "Print the search space and exit.",
                      flag_values=flag_values)
    flags.DEFINE_bool(
        "export_best", False,
        "Train the best config into <workdir>/best and export it.",
        flag_values=flag_values)


def overrides_from_flags(flag_values=FLAGS):
    """{field: value} for every config flag the user set."""
    overrides = {}
    for _, field in _group_fields():
        value = flag_values[field.name].value
        if value is not None:
            overrides[field.name] = value
    return overrides


def config_from_flags(base=None, values=FLAGS):
    """The validated `ExperimentConfig`: defaults overlaid with set flags.

    Args:
      base: starting config (defaults if None).
      values: the parsed `FlagValues`.

    Raises:
      ValueError: a value fails validation; the message names the flag.
    """
    base = base or config_lib.ExperimentConfig()
    return base.replace(**overrides_from_flags(values)).validate()


@contextlib.contextmanager
def exit_on_bad_input():
    """Turns a bad-input error into its message and exit status 1.

    Validation and data loading raise ValueError (or OSError for paths) with
    a message that names the value, what was expected and the fix; a user
    needs that line, not the stack under it. `--verbosity=1` logs the
    traceback too.

    Raises:
      SystemExit: with "error: <message>" (printed to stderr, status 1).
    """
    try:
        yield
    except (ValueError, OSError) as error:
        logging.debug("Traceback of the error below:", exc_info=True)
        raise SystemExit(f"error: {error}") from None
