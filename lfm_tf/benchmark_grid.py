"""A resumable grid of methods x settings x seeds, and its report.

A grid is three lists, each from one flag of `pipelines.benchmark`:

    --grid_methods=erm,focal,lfm_ps:method=lfm;encoder=shared
    --grid_settings=if100:imbalance_factor=100,flip40:noise_type=flip;noise_rate=0.4
    --grid_seeds=0,1,2

A method entry is a method name (`erm`) or `name:field=value;field=value`
(a variant; `method=` may be omitted when `name` is a method). A method's
numeric value may be relative, `xK`: K times the cell's value before the
method (the setting's, else the base's), so `erm_2x:method=erm;epochs=x2`
is step-matched ERM in every setting, whatever its epochs; `xK*field` is K
times another field's value (`drw_start_epoch=x0.8*epochs`), also taken
before the method's own overrides. A setting entry
is always `name:field=value;...`. Fields are `ExperimentConfig` fields, i.e.
any `pipelines.train` flag; the seed sets `seed`. Every cell's config is
validated before the first cell trains, so a typo fails in seconds, not after
an hour of training.

Each cell runs `train_lib.train_and_evaluate` in

    <workdir>/runs/<setting>/<method>/seed_<k>/

and is skipped on a rerun once its `metrics.json` exists; a cell killed
mid-training resumes from its own whole-state checkpoint. Several workers
may run the same command on one machine (or one shared disk) at once: each
trains a cell only while it holds that cell's claim (`fcntl.flock` on
`<cell>/.grid_lock`, released by the kernel when a worker dies, so a killed
worker leaves no stale claim) and passes over cells another worker holds.
A cell that raises is recorded (`cell.json`, status `failed`, with the
error) and the grid goes on; a rerun tries it again. Model selection inside
each cell is on validation only and the test set is read once per cell, by
`train_lib`; this module only reads what the cells wrote (`metrics.json`,
`test_predictions.npz`, `example_weights.npz`, `splits.npz`), never the
data.

A grid of CPU hours spans sessions and checkouts: with an archive folder
(`--grid_archive`, committed), every finished cell's `config.json`,
`cell.json` and `metrics.json` are copied there, and a later run restores
the archived cells whose configuration still matches, so they are neither
trained again nor missing from the report (which then lacks only the
confusion matrices and weight histograms of restored cells: their `.npz`
files are not archived). A cell longer than a session resumes across
checkouts too: `save_progress` archives each unfinished cell's newest
whole-state checkpoint, and the worker that next claims the cell puts it
back before training.

The report, in `<workdir>/`: `results.csv` (one row per run), `results.md`
(mean ± std of test accuracy per method x setting with the best mean per
setting in bold, wall time per cell, the machine, failures) and PNG plots in
`plots/`: `accuracy.png`, `per_class_accuracy.png`,
`confusion_<setting>.png` and `example_weights_<setting>.png`.
"""

import contextlib
import csv
import dataclasses
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import shutil
import sys
import time
import traceback
import typing
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from lfm_tf import config as config_lib
from lfm_tf import fileio
from lfm_tf import grid_comparison
from lfm_tf import workdir as workdir_lib

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CELL_FILE = "cell.json"
GRID_LOCK_FILE = ".grid_lock"


@dataclasses.dataclass(frozen=True)
class GridEntry:
    """One method (or variant) or one setting of the grid.

    Attributes:
      name: directory and table name, e.g. `lfm_ps` or `if100`.
      overrides: ((field, value), ...) applied to the base config.
    """

    name: str
    overrides: Tuple[Tuple[str, object], ...] = ()

    def describe(self):
        if not self.overrides:
            return self.name
        return self.name + ":" + ";".join(f"{k}={v}" for k, v in self.overrides)


@dataclasses.dataclass(frozen=True)
class Scaled:
    """A method entry's relative value `xK` (K times the cell's value of
    the same field) or `xK*source` (K times the `source` field's)."""

    factor: float
    source: Optional[str] = None

    def __str__(self):
        suffix = f"*{self.source}" if self.source else ""
        return f"x{self.factor:g}{suffix}"

    def apply(self, value, kind):
        """K * value as the field's type (ints rounded)."""
        if value is None:
            raise ValueError(
                f"the relative value {self} scales a field that is unset "
                "(None); set it in the setting or the base flags, or give "
                "an absolute value")
        scaled = self.factor * value
        return int(round(scaled)) if kind is int else kind(scaled)


_SCALED = re.compile(r"^x([0-9]+(?:\.[0-9]+)?)(?:\*([A-Za-z0-9_]+))?$")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid: a setting, a method and a seed."""

    setting: GridEntry
    method: GridEntry
    seed: int

    def relative_dir(self):
        return os.path.join("runs", self.setting.name, self.method.name,
                            f"seed_{self.seed}")


@dataclasses.dataclass(frozen=True)
class Grid:
    """Methods x settings x seeds, in the order they are listed."""

    methods: Tuple[GridEntry, ...]
    settings: Tuple[GridEntry, ...]
    seeds: Tuple[int, ...]

    def cells(self) -> List[Cell]:
        # Seeds outermost: a partly finished grid (one that spans sessions)
        # already has every method in every setting at one seed, then two.
        return [Cell(s, m, seed) for seed in self.seeds for s in self.settings
                for m in self.methods]

    def training_order(self, first: Sequence[str] = ()) -> List[Cell]:
        """`cells()`, those of the methods named in `first` at every seed
        before any other: a long grid that spans sessions gets its key
        comparison to all its seeds before the secondary arms start.

        Raises:
          ValueError: a name in `first` is not one of the grid's methods.
        """
        self.check_names("--grid_first", first)
        cells = self.cells()
        return ([c for c in cells if c.method.name in first]
                + [c for c in cells if c.method.name not in first])

    def check_names(self, flag: str, names: Sequence[str]) -> None:
        """Raises ValueError naming `flag` if a name is not a method."""
        methods = [m.name for m in self.methods]
        unknown = [name for name in names if name not in methods]
        if unknown:
            raise ValueError(
                f"Received {flag}={','.join(names)}, whose "
                f"{', '.join(unknown)} is not a method of the grid; expected "
                f"names from --grid_methods ({', '.join(methods)}). Fix the "
                "name or drop it.")

    def check_comparison(self, compare: Sequence[str],
                         controls: Sequence[str]) -> None:
        """Checks `--grid_compare` and `--grid_controls` (the report's
        `grid_comparison`): methods of the grid, both or neither.

        Raises:
          ValueError: an unknown name, or one list without the other.
        """
        self.check_names("--grid_compare", compare)
        self.check_names("--grid_controls", controls)
        if bool(compare) != bool(controls):
            given, missing = (("--grid_compare", "--grid_controls")
                              if compare else
                              ("--grid_controls", "--grid_compare"))
            raise ValueError(
                f"Received {given} without {missing}; expected both (the "
                "arms under test and the arms they are compared with), "
                "e.g. --grid_compare=lfm --grid_controls=erm_2x,"
                "logit_adjusted, or neither.")

    def config_for(self, base, cell):
        """The validated config of `cell`: base, setting, method, seed."""
        overrides = dict(cell.setting.overrides)
        before = base.replace(**overrides)
        types = _field_types()
        for field, value in cell.method.overrides:
            if isinstance(value, Scaled):
                value = value.apply(
                    _field_value(before, value.source or field), types[field])
            overrides[field] = value
        overrides["seed"] = cell.seed
        return base.replace(**overrides).validate()


def _field_value(config, field):
    """The value of flat field `field` in `config`."""
    for group in config.groups():
        if field in {f.name for f in dataclasses.fields(group)}:
            return getattr(group, field)
    raise KeyError(field)


def _field_types():
    types = {}
    for group in dataclasses.fields(config_lib.ExperimentConfig):
        for field in dataclasses.fields(group.default_factory):
            args = [a for a in typing.get_args(field.type)
                    if a is not type(None)]
            types[field.name] = args[0] if args else field.type
    return types


def _optional_fields():
    """Names of the fields that may be None (`Optional[...]`)."""
    return {
        field.name
        for group in dataclasses.fields(config_lib.ExperimentConfig)
        for field in dataclasses.fields(group.default_factory)
        if type(None) in typing.get_args(field.type)
    }


def _convert(kind, text, optional=True):
    """A flag-style string as the field's type (bool: true/false/1/0).

    `none` is None only for an optional field: for the others (e.g.
    `noise_type=none`) it is the string.
    """
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"{text!r} is not a bool")
    if optional and text.strip().lower() == "none":
        return None
    return kind(text)


_FORMS = {
    "method": "a method name (erm) or name:field=value;field=value "
              "(lfm_ps:method=lfm;encoder=shared)",
    "setting": "name:field=value;field=value "
               "(if100:imbalance_factor=100)",
}


def parse_entry(kind: str, text: str) -> GridEntry:
    """Parses one `--grid_methods` or `--grid_settings` entry.

    Args:
      kind: `method` or `setting`.
      text: the entry, e.g. `lfm_ps:method=lfm;encoder=shared`.

    Raises:
      ValueError: naming the entry, what was expected and the fix.
    """
    flag = f"--grid_{kind}s"
    name, colon, spec = text.strip().partition(":")

    def fail(problem):
        raise ValueError(
            f"Received the {flag} entry {text!r}: {problem}. Expected "
            f"{_FORMS[kind]}, with fields that are pipelines.train flags; "
            f"fix the entry in {flag}."
        )

    if not _NAME.match(name):
        fail(f"the name {name!r} is not a plain name ([A-Za-z0-9_.-])")
    types = _field_types()
    overrides = []
    for item in (spec.split(";") if colon else []):
        if not item.strip():
            continue
        field, equals, value = item.partition("=")
        field = field.strip()
        if not equals:
            fail(f"{item!r} has no '='")
        if field not in types:
            fail(f"{field!r} is not a config field")
        if field == "seed":
            fail("the seed comes from --grid_seeds, not from an entry")
        scaled = _SCALED.match(value.strip())
        if scaled and kind == "method" and types[field] in (int, float):
            source = scaled.group(2)
            if source is not None and types.get(source) not in (int, float):
                fail(f"{source!r} in {value.strip()!r} is not a numeric "
                     "config field")
            overrides.append((field, Scaled(float(scaled.group(1)), source)))
            continue
        try:
            overrides.append((field, _convert(
                types[field], value.strip(), field in _optional_fields())))
        except ValueError:
            fail(f"{value!r} is not a valid {types[field].__name__} "
                 f"for {field}")
    fields = dict(overrides)
    if kind == "method":
        if "method" not in fields:
            if name not in config_lib.METHODS:
                fail(f"{name!r} is not a method and the entry sets no "
                     f"method=; methods: {list(config_lib.METHODS)}")
            overrides.insert(0, ("method", name))
    elif not overrides:
        fail("a setting needs at least one field=value")
    if kind == "setting" and "method" in fields:
        fail("a setting may not choose the method; put it in --grid_methods")
    return GridEntry(name, tuple(overrides))


def parse_grid(methods: Sequence[str], settings: Sequence[str],
               seeds: Sequence, base=None) -> Grid:
    """The grid from the three flag lists, every cell validated.

    Args:
      methods: `--grid_methods` entries.
      settings: `--grid_settings` entries.
      seeds: `--grid_seeds` values (ints or their strings).
      base: the `ExperimentConfig` every cell starts from (defaults if None).

    Raises:
      ValueError: a malformed entry, a duplicate name, an empty list, or a
        cell whose config fails validation; the message names it.
    """
    try:
        seed_values = tuple(int(s) for s in seeds)
    except ValueError:
        raise ValueError(
            f"Received --grid_seeds={','.join(map(str, seeds))!r}; expected "
            "comma-separated integers, e.g. --grid_seeds=0,1,2."
        ) from None
    grid = Grid(
        methods=tuple(parse_entry("method", m) for m in methods if m.strip()),
        settings=tuple(parse_entry("setting", s)
                       for s in settings if s.strip()),
        seeds=seed_values,
    )
    for flag, values in (("--grid_methods", [m.name for m in grid.methods]),
                         ("--grid_settings", [s.name for s in grid.settings]),
                         ("--grid_seeds", list(grid.seeds))):
        if not values:
            raise ValueError(
                f"Received an empty {flag}; expected at least one entry, "
                "e.g. --grid_methods=erm --grid_settings=if100:"
                "imbalance_factor=100 --grid_seeds=0."
            )
        duplicates = sorted({str(v) for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(
                f"Received {flag} with repeated names {duplicates}; expected "
                "each once (they name run directories). Rename one, e.g. "
                "lfm_ps:method=lfm;encoder=shared."
            )
    base = base or config_lib.ExperimentConfig()
    for cell in grid.cells():
        try:
            grid.config_for(base, cell)
        except ValueError as error:
            raise ValueError(
                f"Cell setting={cell.setting.describe()!r}, "
                f"method={cell.method.describe()!r}, seed={cell.seed} is "
                f"not a valid config: {error}"
            ) from None
    return grid


def machine_description():
    """One line: CPU, cores, OS, Python, TensorFlow and, once TensorFlow is
    loaded (a cell trains), its GPUs; a report alone never imports it."""
    processor = platform.processor() or platform.machine()
    try:
        version = importlib.metadata.version("tensorflow")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    text = (f"{processor}, {os.cpu_count()} cores, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, "
            f"TensorFlow {version}")
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        gpus = len(tf.config.list_physical_devices("GPU"))
        text += f", {gpus} GPU" + ("" if gpus == 1 else "s")
    return text


def runs_machines(rows: Sequence[Dict]) -> str:
    """The machines the finished cells ran on (`cell.json`), `; `-joined
    in first-seen order: a report written elsewhere (another checkout, a
    laptop reading a GPU grid's archive) names the machines of the runs,
    not its own. This machine where no finished cell recorded one."""
    machines = [r["machine"] for r in rows
                if r["status"] == "done" and r.get("machine")]
    return "; ".join(dict.fromkeys(machines)) or machine_description()


@dataclasses.dataclass
class CellResult:
    """What happened to one cell in this invocation.

    Attributes:
      cell: the `Cell`.
      workdir: its run directory.
      status: `done` (trained now), `skipped` (finished before), `busy`
        (another worker holds it) or `failed`.
      error: the exception text of a failed cell.
    """

    cell: Cell
    workdir: str
    status: str
    error: Optional[str] = None


# ---------------------------------------------------------------- archive
#
# A long grid outlives a session and a checkout: its workdir (checkpoints,
# SavedModels) stays out of version control, but each finished cell's small
# records go to an archive folder that is committed (`--grid_archive`), and
# a rerun in a fresh clone restores them instead of training again.

# What a report needs of a cell; metrics.json last, as it marks the cell
# finished, so an interrupted copy is never taken for a finished cell.
ARCHIVED_FILES = ("config.json", CELL_FILE, "metrics.json")


def archive_cell(cell_dir: str, archive_cell_dir: str) -> None:
    """Copies a finished cell's `ARCHIVED_FILES` to its archive folder."""
    for name in ARCHIVED_FILES:
        source = os.path.join(cell_dir, name)
        if os.path.exists(source):
            with open(source) as f:
                fileio.write_text(os.path.join(archive_cell_dir, name),
                                  f.read())


def restore_cell(archive_cell_dir: str, cell_dir: str, config) -> bool:
    """Restores an archived cell into `cell_dir` if it ran `config`.

    Args:
      archive_cell_dir: the cell's archive folder.
      cell_dir: the cell's run directory (left alone if it has
        `metrics.json` already).
      config: the cell's `ExperimentConfig` now.

    Returns:
      Whether the cell is restored. An archive of another configuration
      (the flagfile changed since) is not, with a warning naming the
      fields: the cell trains again and its new records replace it.
    """
    if _finished(cell_dir) or not _finished(archive_cell_dir):
        return False
    previous = _read_json(os.path.join(archive_cell_dir, "config.json"))
    differences = workdir_lib.config_differences(previous or {},
                                                 config.to_dict())
    if differences:
        logging.warning(
            "Archived cell %s ran another configuration (%s); training it "
            "again.", archive_cell_dir, "; ".join(differences))
        return False
    archive_cell(archive_cell_dir, cell_dir)
    return True


# ---------------------------------------------------------------- progress
#
# A cell longer than a session (exact LFM on the CIFAR long tail: about
# three hours of one core) would never finish if each session started it
# again. `save_progress` copies each unfinished cell's newest whole-state
# checkpoint and its best-on-validation weights into `<archive>/<cell>/
# progress/`; the worker that next claims the cell, in any checkout, puts
# them back and `train_lib` resumes from them. TensorBoard logs stay behind.

PROGRESS_DIR = "progress"
_BACKUP = "backup"
_BEST = os.path.join("checkpoints", "best.weights.h5")


def _latest_state(cell_dir):
    """The newest complete whole-state checkpoint's state, or None."""
    # Imported here: TensorFlow, which reports and finished grids skip.
    from lfm_tf import checkpointing  # pylint: disable=g-import-not-at-top
    return checkpointing.Manager(
        os.path.join(cell_dir, _BACKUP)).latest_state()


def _step(state):
    return -1 if state is None else int(state["global_step"])


def _copy_checkpoint(state, cell_dir, destination, number):
    """Copies a cell's checkpoint `state` (and best weights) to `destination`.

    The checkpoint lands as `<destination>/backup/ckpt-<number>` through a
    temporary directory, so a `ckpt-*` directory is always whole.
    """
    backup = os.path.join(destination, _BACKUP)
    os.makedirs(backup, exist_ok=True)
    scratch = os.path.join(backup, f"tmp-ckpt-{number}")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(state["path"], scratch)
    best = os.path.join(cell_dir, _BEST)
    if os.path.exists(best):
        os.makedirs(os.path.dirname(os.path.join(destination, _BEST)),
                    exist_ok=True)
        shutil.copy2(best, os.path.join(destination, _BEST))
    shutil.copy2(os.path.join(cell_dir, "config.json"),
                 os.path.join(destination, "config.json"))
    os.rename(scratch, os.path.join(backup, f"ckpt-{number}"))


def _consistent_state(cell_dir, wait_s):
    """The newest checkpoint of a cell, taken when the best weights match it.

    At an epoch end the model selection writes `best.weights.h5` a moment
    before the whole-state checkpoint of that epoch: weights newer than the
    newest checkpoint belong to an epoch a resume would train again, so
    this waits (up to `wait_s`) for that epoch's checkpoint.

    Returns:
      the checkpoint's state (with `path`), or None (none yet, or still
      inconsistent after `wait_s`).
    """
    best = os.path.join(cell_dir, _BEST)
    deadline = time.monotonic() + wait_s
    while True:
        state = _latest_state(cell_dir)
        if state is None:
            return None
        written = os.stat(os.path.join(state["path"], "state.json")).st_mtime
        if not os.path.exists(best) or os.stat(best).st_mtime <= written:
            return state
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


def save_progress(grid: Grid, base, workdir: str, archive: str,
                  wait_s: float = 120.0) -> int:
    """Archives each unfinished cell's newest checkpoint (`PROGRESS_DIR`).

    Safe while workers train: it only reads their files, and the archive's
    copy is replaced whole (a temporary folder, then a rename).

    Args:
      grid: the `Grid`.
      base: the `ExperimentConfig` every cell starts from.
      workdir: the grid's directory.
      archive: the archive folder (`--grid_archive`).
      wait_s: how long to wait for an epoch end's checkpoint to be written.

    Returns:
      how many cells' progress was archived (newer than the archive's).
    """
    saved = 0
    for cell in grid.cells():
        cell_dir = os.path.join(workdir, cell.relative_dir())
        archive_cell_dir = os.path.join(archive, cell.relative_dir())
        progress = os.path.join(archive_cell_dir, PROGRESS_DIR)
        if _finished(archive_cell_dir):
            # Finished, here or elsewhere: a checkpoint there (left by a
            # worker that predates this cleanup) is of no more use.
            shutil.rmtree(progress, ignore_errors=True)
            continue
        if _finished(cell_dir) or not os.path.exists(
                os.path.join(cell_dir, "config.json")):
            continue
        differences = workdir_lib.config_differences(
            _read_json(os.path.join(cell_dir, "config.json")) or {},
            grid.config_for(base, cell).to_dict())
        if differences:
            logging.warning("%s ran another configuration (%s); its "
                            "progress is not archived.", cell_dir,
                            "; ".join(differences))
            continue
        state = _archive_progress(cell_dir, progress, wait_s)
        if state is not None:
            logging.info("%s: progress archived at global step %d (epoch "
                         "%d).", cell.relative_dir(), state["global_step"],
                         state["epoch"])
            saved += 1
    return saved


def _archive_progress(cell_dir, progress, wait_s, attempts=3):
    """Replaces `progress` with the cell's newest consistent checkpoint.

    Returns:
      the archived checkpoint's state, or None (none yet, or the archive's
      is as far on).
    """
    for _ in range(attempts):
        state = _consistent_state(cell_dir, wait_s)
        if state is None:
            logging.info("%s: no consistent checkpoint yet.", cell_dir)
            return None
        if _step(state) <= _step(_latest_state(progress)):
            return None
        scratch = progress + ".tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            _copy_checkpoint(state, cell_dir, scratch, 1)
        except FileNotFoundError:
            # Its worker pruned the checkpoint mid-copy, having written a
            # newer one: take that.
            continue
        shutil.rmtree(progress, ignore_errors=True)
        os.rename(scratch, progress)
        return state
    return None


def restore_progress(archive_cell_dir: str, cell_dir: str, config) -> bool:
    """Puts an archived unfinished cell's checkpoint back into `cell_dir`.

    Called by the worker holding the cell, before it trains. Nothing is
    restored when the cell's own newest checkpoint is as far on, or when
    the archive ran another configuration (a warning names the fields).

    Returns:
      whether the cell now resumes from the archived checkpoint.
    """
    progress = os.path.join(archive_cell_dir, PROGRESS_DIR)
    archived = _latest_state(progress)
    if archived is None:
        return False
    differences = workdir_lib.config_differences(
        _read_json(os.path.join(progress, "config.json")) or {},
        config.to_dict())
    if differences:
        logging.warning("Archived progress %s ran another configuration "
                        "(%s); not resumed from.", progress,
                        "; ".join(differences))
        return False
    from lfm_tf import checkpointing  # pylint: disable=g-import-not-at-top
    local = checkpointing.Manager(os.path.join(cell_dir, _BACKUP))
    if _step(archived) <= _step(local.latest_state()):
        return False
    # Numbered after every local checkpoint: the newest number is resumed.
    _copy_checkpoint(archived, progress, cell_dir, local.next_number())
    logging.info("%s: resumes from archived progress at global step %d.",
                 cell_dir, archived["global_step"])
    return True


def restore_grid(grid: Grid, base, workdir: str, archive: str) -> int:
    """Restores every archived cell of `grid` into `workdir`.

    Returns:
      how many cells were restored.
    """
    restored = 0
    for cell in grid.cells():
        restored += restore_cell(
            os.path.join(archive, cell.relative_dir()),
            os.path.join(workdir, cell.relative_dir()),
            grid.config_for(base, cell))
    if restored:
        logging.info("Restored %d finished cells from %s.", restored,
                     archive)
    return restored


def run_grid(grid: Grid, base, workdir: str, train_fn=None,
             archive: Optional[str] = None,
             first: Sequence[str] = ()) -> List[CellResult]:
    """Runs every unfinished cell, in order, then writes nothing else.

    Args:
      grid: the `Grid`.
      base: the `ExperimentConfig` every cell starts from.
      workdir: the grid's directory.
      train_fn: `(config, cell_workdir) -> metrics`; default
        `train_lib.train_and_evaluate` (tests may pass a stand-in).
      archive: optional folder of finished cells' records (see
        `restore_grid`): restored before the cells run, and each cell
        that finishes is archived at once.
      first: methods whose cells train first (`Grid.training_order`).

    Returns:
      one `CellResult` per cell, in training order.
    """
    cells = grid.training_order(first)
    if archive:
        restore_grid(grid, base, workdir, archive)
    results = []
    for number, cell in enumerate(cells, 1):
        cell_dir = os.path.join(workdir, cell.relative_dir())
        label = f"[{number}/{len(cells)}] {cell.relative_dir()}"
        if _finished(cell_dir):
            logging.info("%s: finished before, skipped.", label)
            results.append(CellResult(cell, cell_dir, "skipped"))
            continue
        with cell_lock(cell_dir) as held:
            # Checked again under the lock: another worker may have finished
            # the cell since the check above.
            if held and _finished(cell_dir):
                logging.info("%s: finished before, skipped.", label)
                results.append(CellResult(cell, cell_dir, "skipped"))
            elif held:
                logging.info("%s: training.", label)
                if archive:
                    restore_progress(
                        os.path.join(archive, cell.relative_dir()),
                        cell_dir, grid.config_for(base, cell))
                results.append(_train_cell(grid, base, cell, cell_dir,
                                           train_fn, archive))
            else:
                logging.info("%s: another worker is training it, passed "
                             "over.", label)
                results.append(CellResult(cell, cell_dir, "busy"))
    return results


def _finished(cell_dir):
    return os.path.exists(os.path.join(cell_dir, "metrics.json"))


@contextlib.contextmanager
def cell_lock(cell_dir: str):
    """Claims a cell for this worker, without waiting.

    The claim is `workdir.lock` on `<cell_dir>/.grid_lock`, beside the
    run's own `.lock` that `train_lib` takes inside it.

    Yields:
      whether this worker holds the cell; False when another worker does.
      The kernel drops the claim when its holder exits, however it exits.
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(workdir_lib.lock(cell_dir,
                                                 name=GRID_LOCK_FILE))
        except workdir_lib.WorkdirInUseError:
            yield False
            return
        yield True


def _train_cell(grid, base, cell, cell_dir, train_fn, archive):
    """Trains one cell and records it (`cell.json`, the archive)."""
    config = grid.config_for(base, cell)
    if train_fn is None:
        # Imported here so that a rerun with every cell finished (or a
        # report) starts in a second, without TensorFlow.
        from lfm_tf import train_lib  # pylint: disable=g-import-not-at-top
        train_fn = train_lib.train_and_evaluate
    start = time.time()
    record = {"setting": cell.setting.describe(),
              "method": cell.method.describe(), "seed": cell.seed,
              "machine": machine_description(),
              # Several workers on one machine each run single-threaded.
              "threads": os.environ.get("TF_NUM_INTRAOP_THREADS", "all"),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        train_fn(config, cell_dir)
        record.update(status="done", error=None)
    except Exception as error:  # pylint: disable=broad-except
        # One broken cell (a diverging method, a bad variant) must not
        # cost the rest of a long grid; it is recorded and retried on
        # the next run.
        logging.error("%s failed: %s\n%s", cell.relative_dir(), error,
                      traceback.format_exc())
        record.update(status="failed",
                      error=f"{type(error).__name__}: {error}")
    record["wall_time_s"] = round(time.time() - start, 1)
    fileio.write_text(os.path.join(cell_dir, CELL_FILE),
                      json.dumps(record, indent=2, sort_keys=True))
    if archive and record["status"] == "done":
        archive_cell(cell_dir, os.path.join(archive, cell.relative_dir()))
        shutil.rmtree(os.path.join(archive, cell.relative_dir(),
                                   PROGRESS_DIR), ignore_errors=True)
    _clear_session()
    return CellResult(cell, cell_dir, record["status"], record["error"])


def _clear_session():
    """Frees the finished cell's graphs, so a long grid does not grow."""
    keras = sys.modules.get("keras")
    if keras is not None:
        keras.backend.clear_session()


# ------------------------------------------------------------------ report


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def tail_classes(class_counts):
    """Tail classes: training count strictly below the median count.

    The rule of `reweighting.diagnostics.tail_class_mask`, by which LFM-DR
    tracks a and B head vs tail; restated because that module imports
    TensorFlow and a report must start without it.

    Args:
      class_counts: int [C], training examples per (observed) class.

    Returns:
      bool [C]; all False on balanced counts.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    return counts < np.median(counts)


def head_tail_accuracy(per_class, class_counts):
    """(head, tail) test accuracy of one run.

    Each is the mean of the per-class test accuracies over its classes
    (class-averaged, like the per-class plot), tail as in `tail_classes`.

    Args:
      per_class: [C] test accuracy per class; None for a class absent from
        the test set (left out of the mean).
      class_counts: int [C], the run's training examples per class.

    Returns:
      (head, tail) floats; None for a group with no class with a value.
    """
    accuracy = np.array([np.nan if v is None else v for v in per_class],
                        dtype=np.float64)
    tail = tail_classes(class_counts)

    def mean(mask):
        values = accuracy[mask]
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else None

    return mean(~tail), mean(tail)


# LFM-DR's last-epoch means of a (mistake term) and B (example weight) by
# group: clean / corrupted under label noise, head / tail under a long tail.
_GROUPS = (("clean", "corrupted"), ("head", "tail"))
DIAGNOSTIC_FIELDS = ("mean_b_alignment",) + tuple(
    f"last_epoch_{weight}_{group}" for pair in _GROUPS
    for weight in ("a", "b") for group in pair)
_REPORT_FIELDS = ("test_accuracy_head", "test_accuracy_tail"
                  ) + DIAGNOSTIC_FIELDS


def _imbalanced(config):
    return bool(config) and config["data"]["imbalance_factor"] > 1


def alignment_curve(metrics, config):
    """b_alignment per epoch of one run, or None where it was not computed.

    A run tracks it as an epoch's latest value; with `diagnostics_every=0`
    it is never computed and the tracked zeros mean nothing.
    """
    per_epoch = metrics.get("train_metrics_per_epoch") or {}
    method = (config or {}).get("method", {})
    if "b_alignment" not in per_epoch or not method.get(
            "diagnostics_every", 1):
        return None
    return [float(v) for v in per_epoch["b_alignment"]]


def lfm_diagnostics(metrics, config):
    """`DIAGNOSTIC_FIELDS` of one run; {} when its metrics have no
    b_alignment (not an LFM-DR run).

    Clean / corrupted values are None without label noise (there the
    corrupted means are empty, 0) and head / tail ones None without a long
    tail (noise alone makes near-equal counts fall either side of the
    median).
    """
    per_epoch = metrics.get("train_metrics_per_epoch") or {}
    if "b_alignment" not in per_epoch:
        return {}
    curve = alignment_curve(metrics, config)
    shown = {"clean": (metrics.get("train_noise_rate") or 0) > 0,
             "head": _imbalanced(config)}
    values = {"mean_b_alignment": float(np.mean(curve)) if curve else None}
    for pair in _GROUPS:
        for weight in ("a", "b"):
            for group in pair:
                series = per_epoch.get(f"{weight}_{group}")
                values[f"last_epoch_{weight}_{group}"] = (
                    float(series[-1]) if shown[pair[0]] and series else None)
    return values


def _report_fields(cell_dir, metrics):
    """The run's head / tail test accuracy and LFM-DR diagnostics, and
    (private, for the plots) its b_alignment curve and, under a long tail,
    its training counts per class."""
    config = _read_json(os.path.join(cell_dir, "config.json"))
    fields = dict.fromkeys(_REPORT_FIELDS)
    fields.update(lfm_diagnostics(metrics, config))
    fields["_alignment"] = alignment_curve(metrics, config)
    per_class = metrics.get("test_accuracy_per_class")
    counts = (_train_class_counts(cell_dir, metrics, len(per_class))
              if per_class and _imbalanced(config) else None)
    fields["_class_counts"] = counts
    if counts is not None:
        fields["test_accuracy_head"], fields["test_accuracy_tail"] = (
            head_tail_accuracy(per_class, counts))
    return fields


def _train_class_counts(cell_dir, metrics, num_classes):
    """The counts the run trained on (observed labels), as train_lib hands
    them to the methods: from metrics.json, else (runs before it recorded
    them) from splits.npz; None without either."""
    if metrics and metrics.get("train_class_counts"):
        return np.asarray(metrics["train_class_counts"])
    splits = _load_npz(cell_dir, "splits.npz")
    if splits is None:
        return None
    return np.bincount(splits["train_labels"], minlength=num_classes)


def collect_rows(grid: Grid, workdir: str) -> List[Dict]:
    """One row per cell from what the cells wrote (no data is read).

    A cell with `metrics.json` is `done`; one with only a failed
    `cell.json` is `failed`; otherwise `pending`. Besides the metrics,
    a row has the head / tail test accuracy (long-tail settings, from the
    cell's `splits.npz`) and LFM-DR's diagnostics (`DIAGNOSTIC_FIELDS`),
    None where they do not apply.
    """
    rows = []
    for cell in grid.cells():
        cell_dir = os.path.join(workdir, cell.relative_dir())
        metrics = _read_json(os.path.join(cell_dir, "metrics.json"))
        record = _read_json(os.path.join(cell_dir, CELL_FILE)) or {}
        status = "done" if metrics else record.get("status", "pending")
        if status == "done" and not metrics:
            status = "pending"
        row = {
            "setting": cell.setting.name,
            "method": cell.method.name,
            "seed": cell.seed,
            "status": status,
            "test_accuracy": None,
            "best_val_accuracy": None,
            "best_epoch": None,
            "wall_time_s": record.get("wall_time_s"),
            "final_b_clean_mean": None,
            "final_b_corrupted_mean": None,
            "test_accuracy_per_class": None,
            "machine": record.get("machine"),
            "error": record.get("error") if status == "failed" else None,
            "workdir": cell.relative_dir(),
            # New columns go last, so results.csv's earlier ones keep their
            # places.
            **dict.fromkeys(_REPORT_FIELDS),
            "train_seconds": None,
        }
        if metrics:
            for key in ("test_accuracy", "best_val_accuracy", "best_epoch",
                        "final_b_clean_mean", "final_b_corrupted_mean",
                        "test_accuracy_per_class", "train_seconds"):
                row[key] = metrics.get(key)
            row.update(_report_fields(cell_dir, metrics))
        rows.append(row)
    return rows


def results_csv(rows: Sequence[Dict]) -> str:
    """The rows as CSV; lists (per-class accuracy) as space-separated.
    Private keys (`_dir`, `_alignment`, `_class_counts`: the report's
    own) are left out."""
    buffer = io.StringIO()
    if not rows:
        return ""
    writer = csv.DictWriter(
        buffer, fieldnames=[k for k in rows[0] if not k.startswith("_")])
    writer.writeheader()
    for row in rows:
        writer.writerow({
            k: " ".join("" if x is None else f"{x:.4f}" for x in v)
            if isinstance(v, list) else ("" if v is None else v)
            for k, v in row.items() if not k.startswith("_")})
    return buffer.getvalue()


def _mean_std(values):
    """(mean, sample std or None for one value, n) of non-None values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std, len(values)


def cell_seconds(row):
    """A finished cell's cost in seconds, and whether it is only a
    lower bound: the run's summed epoch times (`train_seconds`, across
    resumes), else (runs from before they were recorded) `cell.json`'s
    wall time of the last invocation, which misses the time before a
    restart."""
    if row.get("train_seconds") is not None:
        return row["train_seconds"], False
    return row["wall_time_s"], row["wall_time_s"] is not None


def summary(grid: Grid, rows: Sequence[Dict]):
    """{(setting, method): (mean, std, n, mean seconds, partial)} of
    finished runs; `partial` when a run's seconds are only its last
    invocation's (`cell_seconds`)."""
    table = {}
    for setting in grid.settings:
        for method in grid.methods:
            mine = [r for r in rows if r["setting"] == setting.name
                    and r["method"] == method.name and r["status"] == "done"]
            mean, std, n = _mean_std([r["test_accuracy"] for r in mine])
            seconds = [cell_seconds(r) for r in mine]
            wall, _, _ = _mean_std([value for value, _ in seconds])
            table[(setting.name, method.name)] = (
                mean, std, n, wall, any(partial for _, partial in seconds))
    return table


def _best_methods(grid, table):
    """{setting: names of the methods with the best mean (ties: all)}."""
    best = {}
    for setting in grid.settings:
        means = {m.name: table[(setting.name, m.name)][0]
                 for m in grid.methods
                 if table[(setting.name, m.name)][0] is not None}
        if means:
            top = max(means.values())
            # Rounded as printed, so that the bold agrees with the digits.
            best[setting.name] = {m for m, v in means.items()
                                  if round(100 * v, 2) == round(100 * top, 2)}
    return best


def _done(rows, setting, method):
    return [r for r in rows if r["setting"] == setting
            and r["method"] == method and r["status"] == "done"]


def _mean_std_text(values, scale=1.0, digits=3):
    """`mean ± std` of the non-None values (`mean` alone for one), `–` for
    none."""
    mean, std, _ = _mean_std(values)
    if mean is None:
        return "–"
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else text + f" ± {scale * std:.{digits}f}"


def head_tail_lines(grid: Grid, rows: Sequence[Dict]) -> List[str]:
    """The head / tail accuracy table; [] when no setting has a long tail."""
    settings = [s.name for s in grid.settings
                if any(r["setting"] == s.name
                       and r.get("test_accuracy_head") is not None
                       for r in rows)]
    if not settings:
        return []
    lines = [
        "", "Head / tail test accuracy (%), mean ± std over seeds: the mean "
        "per-class accuracy over the head classes and over the tail classes "
        "(fewer training examples than the median class, as each run's "
        "training labels count them); long-tail settings "
        "(imbalance_factor > 1) only:", "",
        "| method | " + " | ".join(f"{s} head | {s} tail" for s in settings)
        + " |",
        "|---|" + "---|---|" * len(settings)]
    for method in grid.methods:
        cells = []
        for setting in settings:
            mine = _done(rows, setting, method.name)
            cells += [_mean_std_text([r.get(f"test_accuracy_{g}")
                                      for r in mine], 100, 2)
                      for g in ("head", "tail")]
        lines.append(f"| {method.name} | " + " | ".join(cells) + " |")
    return lines


_DIAGNOSTIC_HEADERS = {"mean_b_alignment": "b_alignment"}
_GROUP_NAMES = {"corrupted": "noisy"}


def _diagnostic_header(field):
    if field in _DIAGNOSTIC_HEADERS:
        return _DIAGNOSTIC_HEADERS[field]
    weight, group = field[len("last_epoch_"):].split("_")
    return f"{'B' if weight == 'b' else 'a'} {_GROUP_NAMES.get(group, group)}"


def lfm_diagnostics_lines(grid: Grid, rows: Sequence[Dict]) -> List[str]:
    """The LFM-DR diagnostics table, one row per setting x method with
    them; [] when no run has them (a grid without LFM-DR)."""
    pairs = [(s.name, m.name) for s in grid.settings for m in grid.methods
             if any(any(r.get(f) is not None for f in DIAGNOSTIC_FIELDS)
                    for r in _done(rows, s.name, m.name))]
    if not pairs:
        return []
    # Columns no row fills (clean / noisy in a grid without noise) are left
    # out rather than shown as a column of dashes.
    fields = [f for f in DIAGNOSTIC_FIELDS
              if any(r.get(f) is not None for s, m in pairs
                     for r in _done(rows, s, m))]
    lines = [
        "", "LFM-DR diagnostics, mean ± std over seeds. b_alignment is "
        "cos(dL/dB, ∇_B L_val(W1′)), the cosine of B's step −dL/dB with "
        "−∇_B L_val(W1′): positive means B's step also lowers W1's "
        "validation loss (mean over epochs of each epoch's latest value, "
        "computed every diagnostics_every steps). a (the mistake term) and "
        "B (the example weight) are the last epoch's means over training "
        "batches, by clean / noisy labels (label-noise settings) and head / "
        "tail classes (long-tail settings):", "",
        "| setting | method | " + " | ".join(
            _diagnostic_header(f) for f in fields) + " |",
        "|---|---|" + "---|" * len(fields)]
    for setting, method in pairs:
        mine = _done(rows, setting, method)
        cells = [_mean_std_text([r.get(f) for r in mine]) for f in fields]
        lines.append(f"| {setting} | {method} | " + " | ".join(cells) + " |")
    return lines


def status_lines(rows: Sequence[Dict], machine: str) -> List[str]:
    """The report's run counts (done, failed, pending) and machine lines."""
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("done", "failed", "pending")}
    return [
        "",
        f"Runs: {counts['done']} done, {counts['failed']} failed, "
        f"{counts['pending']} pending, of {len(rows)}.",
        f"Machine: {machine}.",
    ]


def remaining_lines(rows: Sequence[Dict]) -> List[str]:
    """How long the unfinished cells will take, where it can be told.

    A pending (or failed) cell is estimated by the mean `cell_seconds` of
    the finished seeds of its method in its setting, so the estimate holds
    for the speed the grid has run at (workers sharing cores included);
    a cell with no such seed yet is counted, not guessed.

    Returns:
      [] for a finished grid; else a blank line and one line of text.
    """
    unfinished = [r for r in rows if r["status"] != "done"]
    if not unfinished:
        return []
    known = {}
    for row in rows:
        if row["status"] == "done":
            known.setdefault((row["setting"], row["method"]), []).append(
                cell_seconds(row)[0])
    estimates = [np.mean([v for v in known[(r["setting"], r["method"])]
                          if v is not None])
                 for r in unfinished
                 if any(v is not None for v in
                        known.get((r["setting"], r["method"]), [None]))]
    text = (f"Left: {len(unfinished)} cells. {len(estimates)} of them have "
            "a finished seed of their method in their setting")
    if estimates:
        text += (f": about {sum(estimates) / 3600:.1f} h of one worker at "
                 "the speed those ran at")
    missing = len(unfinished) - len(estimates)
    return ["", text + (f"; no estimate yet for the other {missing}."
                        if missing else ".")]


def results_markdown(grid: Grid, rows: Sequence[Dict], machine: str,
                     title: str = "Benchmark grid",
                     compare: Sequence[str] = (),
                     controls: Sequence[str] = ()) -> str:
    """Mean ± std test accuracy (%) per method x setting, best in bold;
    then, when `compare` and `controls` name arms, where the arms under
    test stand against the controls (`grid_comparison`)."""
    table = summary(grid, rows)
    best = _best_methods(grid, table)
    settings = [s.name for s in grid.settings]
    lines = [
        f"# {title}", "",
        "Test accuracy (%), mean ± sample std over seeds (n runs); best "
        "mean per setting in **bold**. Each run selects its epoch on the "
        "clean validation (meta) set and reads the test set once.", "",
        "| method | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for method in grid.methods:
        cells = []
        for setting in settings:
            mean, std, n, *_ = table[(setting, method.name)]
            if mean is None:
                cells.append("–")
                continue
            text = f"{100 * mean:.2f}"
            if std is not None:
                text += f" ± {100 * std:.2f}"
            if method.name in best.get(setting, ()):
                text = f"**{text}**"
            cells.append(f"{text} ({n})")
        lines.append(f"| {method.name} | " + " | ".join(cells) + " |")
    lines += grid_comparison.comparison_lines(rows, settings, compare,
                                              controls)
    lines += head_tail_lines(grid, rows) + lfm_diagnostics_lines(grid, rows)
    lines += ["", "Time per cell (s, mean over finished seeds): the run's "
              "epochs, training and validation, summed across restarts"
              + ("; * marks a mean with runs from before that was recorded, "
                 "which count their last invocation only (a lower bound)"
                 if any(entry[4] for entry in table.values()) else "")
              + ". Workers sharing the cores (`cell.json`'s `threads`) "
              "make each cell slower:", "",
              "| method | " + " | ".join(settings) + " |",
              "|---|" + "---|" * len(settings)]
    for method in grid.methods:
        cells = []
        for setting in settings:
            _, _, _, wall, partial = table[(setting, method.name)]
            cells.append("–" if wall is None
                         else f"{wall:.0f}" + ("*" if partial else ""))
        lines.append(f"| {method.name} | " + " | ".join(cells) + " |")
    lines += status_lines(rows, machine) + remaining_lines(rows) + [
        "",
        "Methods: " + "; ".join(m.describe() for m in grid.methods) + ".",
        "Settings: " + "; ".join(s.describe() for s in grid.settings) + ".",
        f"Seeds: {', '.join(map(str, grid.seeds))}.",
    ]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed runs (retried on the next run):", ""]
        lines += [f"- `{r['workdir']}`: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- plots


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display)."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    return plt


def _save(figure, path):
    """Saves a PNG atomically and closes the figure."""
    tmp = path + ".tmp.png"
    figure.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    _pyplot().close(figure)
    return path


def plot_accuracy(grid, rows, path):
    """Grouped bars: mean test accuracy per setting, one bar per method."""
    plt = _pyplot()
    table = summary(grid, rows)
    num_methods = len(grid.methods)
    width = 0.8 / num_methods
    figure, axis = plt.subplots(
        figsize=(max(6, 2 + 0.35 * num_methods * len(grid.settings)), 4),
        layout="constrained")
    positions = np.arange(len(grid.settings))
    for i, method in enumerate(grid.methods):
        stats = [table[(s.name, method.name)] for s in grid.settings]
        means = [100 * (m if m is not None else np.nan) for m, *_ in stats]
        stds = [100 * (s or 0.0) for _, s, *_ in stats]
        axis.bar(positions + (i - (num_methods - 1) / 2) * width, means,
                 width, yerr=stds, capsize=2, label=method.name)
    axis.set_xticks(positions, [s.name for s in grid.settings])
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("Test accuracy per method and setting (mean ± std)")
    axis.legend(fontsize="small", ncol=2)
    return _save(figure, path)


def _subplots(count, columns, size=(4, 3.2)):
    plt = _pyplot()
    columns = max(1, min(columns, count))
    grid_rows = math.ceil(count / columns)
    figure, axes = plt.subplots(
        grid_rows, columns, squeeze=False,
        figsize=(size[0] * columns, size[1] * grid_rows),
        layout="constrained")
    flat = list(axes.flat)
    for axis in flat[count:]:
        axis.set_visible(False)
    return figure, flat[:count]


def plot_per_class(grid, rows, path):
    """Per-class test accuracy, classes head -> tail (the paper's Fig. 6).

    Under a long tail, classes are ordered by their training count in the
    run's splits; otherwise by id. Accuracy is the mean over finished
    seeds.
    """
    figure, axes = _subplots(len(grid.settings), 2, size=(5, 3.5))
    for axis, setting in zip(axes, grid.settings):
        order = None
        for method in grid.methods:
            mine = [r for r in rows if r["setting"] == setting.name
                    and r["method"] == method.name and r["status"] == "done"
                    and r["test_accuracy_per_class"]]
            if not mine:
                continue
            per_class = np.array([[np.nan if v is None else v
                                   for v in r["test_accuracy_per_class"]]
                                  for r in mine], dtype=np.float64)
            if order is None:
                order = _class_order(mine[0], per_class.shape[1])
            axis.plot(np.arange(len(order)),
                      100 * np.nanmean(per_class, axis=0)[order],
                      marker="o", markersize=3, label=method.name)
        axis.set_title(setting.name)
        axis.set_xlabel("class (long tail: most to fewest training "
                        "examples)")
        axis.set_ylabel("test accuracy (%)")
        if order is not None:
            axis.set_xticks(np.arange(len(order)), [str(c) for c in order])
            axis.legend(fontsize="x-small")
        else:
            # A partial grid: say so rather than draw empty axes.
            axis.text(0.5, 0.5, "no finished run yet", ha="center",
                      va="center", transform=axis.transAxes)
    figure.suptitle("Per-class test accuracy (mean over seeds)")
    return _save(figure, path)


def _class_order(row, num_classes):
    """Class ids by training count (descending) under a long tail; else
    by id (noise alone only shuffles near-equal counts). The counts are
    the ones `collect_rows` kept (long tails only)."""
    counts = row.get("_class_counts")
    if counts is None:
        return np.arange(num_classes)
    return np.argsort(-np.asarray(counts), kind="stable")


def _load_npz(cell_dir, name):
    path = os.path.join(cell_dir, name)
    if not os.path.exists(path):
        return None
    with np.load(path) as arrays:
        return {k: arrays[k] for k in arrays.files}


def plot_confusion(grid, rows, setting, path):
    """Row-normalised test confusion matrices of `setting`, one per method.

    Built from each run's `test_predictions.npz` (the one test pass of
    `train_lib`), summed over seeds. Returns None when no run has them.
    """
    matrices = []
    for method in grid.methods:
        total = None
        for row in rows:
            if (row["setting"], row["method"], row["status"]) != (
                    setting.name, method.name, "done"):
                continue
            saved = _load_npz(row["_dir"], "test_predictions.npz")
            if saved is None:
                continue
            size = len(row["test_accuracy_per_class"] or []) or int(
                max(saved["labels"].max(), saved["predictions"].max()) + 1)
            counts = np.zeros((size, size))
            np.add.at(counts, (saved["labels"], saved["predictions"]), 1)
            total = counts if total is None else total + counts
        if total is not None:
            matrices.append((method.name, total))
    if not matrices:
        logging.info("No test_predictions.npz for %s; no confusion matrix.",
                     setting.name)
        return None
    figure, axes = _subplots(len(matrices), 4, size=(3.4, 3.2))
    for axis, (name, counts) in zip(axes, matrices):
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = axis.imshow(rates, vmin=0, vmax=1, cmap="Blues")
        axis.set_title(name, fontsize="small")
        ticks = np.arange(len(rates))
        axis.set_xticks(ticks, [str(t) for t in ticks], fontsize="x-small")
        axis.set_yticks(ticks, [str(t) for t in ticks], fontsize="x-small")
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
    figure.colorbar(image, ax=axes, shrink=0.8, label="fraction of true class")
    figure.suptitle(f"Test confusion matrices, {setting.name} "
                    "(summed over seeds)")
    return _save(figure, path)


def plot_example_weights(grid, rows, setting, path):
    """Histograms of learned per-example weights of `setting`.

    One row per method that learns a weight per training example (LFM's B,
    the penalty method's a; `example_weights.npz`); columns: clean vs
    corrupted examples (when there is label noise) and head vs tail classes
    (when the run's imbalance_factor > 1: tail as in `tail_classes`, by
    observed label). Returns None when no run has per-example weights.
    """
    found = []
    for method in grid.methods:
        weights, corrupted, labels, imbalanced = [], [], [], False
        for row in rows:
            if (row["setting"], row["method"], row["status"]) != (
                    setting.name, method.name, "done"):
                continue
            saved = _load_npz(row["_dir"], "example_weights.npz")
            if saved is None:
                continue
            weights.append(saved["weights"].reshape(-1))
            corrupted.append(saved["is_corrupted"].astype(bool))
            labels.append(saved["train_labels"])
            imbalanced |= _imbalanced(
                _read_json(os.path.join(row["_dir"], "config.json")))
        if weights:
            found.append((method.name, np.concatenate(weights),
                          np.concatenate(corrupted), np.concatenate(labels),
                          imbalanced))
    if not found:
        logging.info("No example_weights.npz for %s; no weight histogram.",
                     setting.name)
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(len(found), 2, squeeze=False,
                                figsize=(9, 3 * len(found)),
                                layout="constrained")
    for (name, weights, corrupted, labels, imbalanced), (left, right) in zip(
            found, axes):
        bins = np.histogram_bin_edges(weights, bins=30)
        if corrupted.any():
            left.hist(weights[~corrupted], bins, alpha=0.6, density=True,
                      label=f"clean ({(~corrupted).sum()})")
            left.hist(weights[corrupted], bins, alpha=0.6, density=True,
                      label=f"corrupted ({corrupted.sum()})")
            left.legend(fontsize="small")
        else:
            left.text(0.5, 0.5, "no corrupted labels", ha="center",
                      transform=left.transAxes)
        left.set_title(f"{name}: clean vs corrupted")
        # The report's head / tail rule, on the counts pooled over seeds.
        head = ~tail_classes(np.bincount(labels))[labels]
        # Noise alone makes observed counts differ a little; head and tail
        # only mean something under a long tail (imbalance_factor > 1).
        if imbalanced:
            right.hist(weights[head], bins, alpha=0.6, density=True,
                       label=f"head classes ({head.sum()})")
            right.hist(weights[~head], bins, alpha=0.6, density=True,
                       label=f"tail classes ({(~head).sum()})")
            right.legend(fontsize="small")
        else:
            right.text(0.5, 0.5, "no long tail (imbalance_factor 1)", ha="center",
                       transform=right.transAxes)
        right.set_title(f"{name}: head vs tail")
        for axis in (left, right):
            axis.set_xlabel("learned weight")
            axis.set_ylabel("density")
    figure.suptitle(f"Learned per-example weights, {setting.name} "
                    "(pooled over seeds)")
    return _save(figure, path)


def plot_alignment(grid, rows, path):
    """b_alignment per epoch: one panel per setting, one line per LFM-DR
    method (mean over finished seeds, the band their min to max).

    Returns None when no run computed the alignment (a grid without LFM-DR,
    or `diagnostics_every=0`).
    """
    panels = []
    for setting in grid.settings:
        lines = []
        for method in grid.methods:
            curves = []
            for row in _done(rows, setting.name, method.name):
                # Kept by `collect_rows`, which read the run's files.
                if row.get("_alignment"):
                    curves.append(row["_alignment"])
            if curves:
                # Seeds of one cell train equally long; a resumed run that
                # logged fewer epochs is cut to the shortest.
                length = min(len(c) for c in curves)
                lines.append((method.name, np.array(
                    [c[:length] for c in curves])))
        if lines:
            panels.append((setting.name, lines))
    if not panels:
        logging.info("No b_alignment in any run; no alignment plot.")
        return None
    figure, axes = _subplots(len(panels), 2, size=(5, 3.5))
    for axis, (setting, lines) in zip(axes, panels):
        for name, curves in lines:
            epochs = np.arange(1, curves.shape[1] + 1)
            axis.plot(epochs, curves.mean(0), label=name)
            axis.fill_between(epochs, curves.min(0), curves.max(0),
                              alpha=0.2)
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_ylim(-1.05, 1.05)
        axis.set_xlabel("epoch")
        axis.set_ylabel("cos(dL/dB, grad_B L_val(W1'))")
        axis.set_title(setting)
        axis.legend(fontsize="small")
    figure.suptitle("b_alignment per epoch (mean over seeds, band: min-max)")
    return _save(figure, path)


def write_report(grid: Grid, workdir: str, machine: Optional[str] = None,
                 title: str = "Benchmark grid", extra_fields=None,
                 markdown_fn=None, compare: Sequence[str] = (),
                 controls: Sequence[str] = ()) -> Dict[str, object]:
    """Writes results.csv, results.md and plots/*.png from the cells' files.

    Args:
      grid: the `Grid`.
      workdir: the grid's directory.
      machine: the machine line (default: the machines the finished
        cells recorded, `runs_machines`).
      title: results.md's title.
      extra_fields: optional `row -> {column: value}`, columns appended to
        every row (and results.csv), e.g. a NAS protocol's parameter counts.
      markdown_fn: optional `(grid, rows, machine, title) -> str` replacing
        `results_markdown` (the plots are appended either way).
      compare, controls: method names; the arms under test and the arms
        they are compared with (`grid_comparison`), in `results_markdown`.

    Returns:
      {"csv": path, "markdown": path, "plots": [paths], "rows": rows}.
    """
    rows = collect_rows(grid, workdir)
    if extra_fields is not None:
        for row in rows:
            row.update(extra_fields(row))
    machine = machine or runs_machines(rows)
    csv_path = os.path.join(workdir, "results.csv")
    md_path = os.path.join(workdir, "results.md")
    fileio.write_text(csv_path, results_csv(rows))
    if markdown_fn is None:
        markdown = results_markdown(grid, rows, machine, title,
                                    compare=compare, controls=controls)
    else:
        markdown = markdown_fn(grid, rows, machine, title)
    plot_dir = os.path.join(workdir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    for row in rows:
        row["_dir"] = os.path.join(workdir, row["workdir"])
    plots = []
    if any(r["status"] == "done" for r in rows):
        plots.append(plot_accuracy(grid, rows,
                                   os.path.join(plot_dir, "accuracy.png")))
        plots.append(plot_per_class(
            grid, rows, os.path.join(plot_dir, "per_class_accuracy.png")))
        plots.append(plot_alignment(
            grid, rows, os.path.join(plot_dir, "alignment.png")))
        for setting in grid.settings:
            plots.append(plot_confusion(
                grid, rows, setting,
                os.path.join(plot_dir, f"confusion_{setting.name}.png")))
            plots.append(plot_example_weights(
                grid, rows, setting,
                os.path.join(plot_dir, f"example_weights_{setting.name}.png")))
    plots = [p for p in plots if p]
    if plots:
        markdown += "\nPlots:\n\n" + "\n".join(
            f"![{os.path.basename(p)}](plots/{os.path.basename(p)})"
            for p in plots) + "\n"
    fileio.write_text(md_path, markdown)
    for row in rows:
        row.pop("_dir")
    return {"csv": csv_path, "markdown": md_path, "plots": plots,
            "rows": rows}
