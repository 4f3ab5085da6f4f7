"""Searched cells against random cells, each trained from scratch (issue 9).

The protocol, in one `--workdir`:

    search/<method>/         one search per method (`search_lib.run_search`),
                             every method with the same search budget
    genotypes/random_<k>.json   K random cells (`genotypes.random_genotype`,
                             seed k) from the same space and node count
    runs/train/<genotype>/seed_<s>/   each genotype trained from scratch with
                             the same training budget: a `benchmark_grid`
                             cell whose "method" is `erm` with
                             `genotype=<its genotype.json>`
    parameters.json          trainable parameters per genotype (the derived
                             network without its auxiliary head, DARTS'
                             convention)
    results.csv, results.md, plots/   the report

Rerunning the same command skips finished searches (their
`search_summary.json`), keeps the random cells already drawn, skips finished
cells and resumes interrupted ones (`benchmark_grid.run_grid`).

The searches read the training and meta splits only. Each training run
selects its epoch on the validation (meta) split and reads the test split
once (`train_lib`); the report only reads what the runs wrote.
"""

import dataclasses
import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from lfm_tf import benchmark_grid
from lfm_tf import config as config_lib
from lfm_tf import fileio
from lfm_tf.nas import genotypes

SEARCH_DIR = "search"
RANDOM_DIR = "genotypes"
PARAMETERS_FILE = "parameters.json"
SUMMARY_FILE = "search_summary.json"
GENOTYPE_FILE = "genotype.json"  # What a search writes (search_lib).
# The one grid setting: the training budget every genotype gets.
TRAIN_SETTING = "train"
RANDOM_PREFIX = "random_"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What to search and how to train, parsed from the protocol's flags.

    Attributes:
      searches: one `GridEntry` per search method (`darts`, or a variant
        `name:method=darts;arch_order=first`).
      search_budget: overrides of every search (epochs, batch size, ...).
      train_budget: overrides of every training run (the grid's setting).
      num_random: random genotypes trained as the baseline.
      seeds: seeds of every training run.
    """

    searches: Tuple[benchmark_grid.GridEntry, ...]
    search_budget: benchmark_grid.GridEntry
    train_budget: benchmark_grid.GridEntry
    num_random: int
    seeds: Tuple[int, ...]

    def search_config(self, base, entry):
        """The validated config of one search."""
        overrides = dict(self.search_budget.overrides)
        overrides.update(entry.overrides)
        return base.replace(**overrides).validate()

    def genotype_names(self):
        return ([e.name for e in self.searches]
                + [f"{RANDOM_PREFIX}{k}" for k in range(self.num_random)])

    def grid(self, workdir) -> benchmark_grid.Grid:
        """Training runs: one grid "method" per genotype (erm + its file)."""
        variants = []
        for name in self.genotype_names():
            variants.append(benchmark_grid.GridEntry(name, (
                ("method", "erm"),
                ("genotype", genotype_path(workdir, name, self)))))
        return benchmark_grid.Grid(methods=tuple(variants),
                                   settings=(self.train_budget,),
                                   seeds=self.seeds)


def genotype_path(workdir, name, protocol):
    """Where genotype `name`'s genotype.json is (or will be)."""
    if name in {e.name for e in protocol.searches}:
        return os.path.join(workdir, SEARCH_DIR, name, GENOTYPE_FILE)
    return os.path.join(workdir, RANDOM_DIR, f"{name}.json")


def _budget(flag, text, name):
    """`field=value;...` as a GridEntry; errors name the protocol flag."""
    if not text.strip():
        return benchmark_grid.GridEntry(name)
    try:
        return benchmark_grid.parse_entry("setting", f"{name}:{text}")
    except ValueError as error:
        raise ValueError(
            f"Received {flag}={text!r}: "
            + str(error).replace("--grid_settings", flag)) from None


def parse_protocol(methods: Sequence[str], search_budget: str,
                   train_budget: str, num_random: int, seeds: Sequence,
                   base=None, workdir="workdir") -> Protocol:
    """The protocol from its flags; every search and run config validated.

    Args:
      methods: `--nas_methods` entries (search methods or their variants).
      search_budget: `--nas_search`, `field=value;...`.
      train_budget: `--nas_train`, `field=value;...`.
      num_random: `--nas_random_genotypes`.
      seeds: `--nas_seeds`.
      base: the config every search and run starts from.
      workdir: only names the genotype files in the validated configs.

    Raises:
      ValueError: a malformed entry, a method that does not search, clashing
        names or an invalid config; the message names it and the fix.
    """
    base = base or config_lib.ExperimentConfig()
    searches = []
    for text in methods:
        if not text.strip():
            continue
        try:
            entry = benchmark_grid.parse_entry("method", text)
        except ValueError as error:
            raise ValueError(str(error).replace("--grid_methods",
                                                "--nas_methods")) from None
        method = dict(entry.overrides)["method"]
        if method not in config_lib.SEARCH_METHODS:
            raise ValueError(
                f"Received the --nas_methods entry {text!r}, which trains "
                f"{method!r}; expected a search method, one of "
                f"{list(config_lib.SEARCH_METHODS)}, e.g. "
                "--nas_methods=darts,lfm_darts."
            )
        searches.append(entry)
    if not searches:
        raise ValueError("Received an empty --nas_methods; expected at least "
                         "one search, e.g. --nas_methods=darts,lfm_darts.")
    if num_random < 0:
        raise ValueError(f"Received --nas_random_genotypes={num_random}; "
                         "expected 0 or more (3 is the issue's baseline).")
    try:
        seed_values = tuple(int(s) for s in seeds)
    except ValueError:
        raise ValueError(f"Received --nas_seeds={list(seeds)}; expected "
                         "integers, e.g. --nas_seeds=0,1,2.") from None
    if not seed_values:
        raise ValueError("Received an empty --nas_seeds; expected e.g. 0.")
    protocol = Protocol(
        searches=tuple(searches),
        search_budget=_budget("--nas_search", search_budget, "search"),
        train_budget=_budget("--nas_train", train_budget, TRAIN_SETTING),
        num_random=num_random, seeds=seed_values)
    names = protocol.genotype_names()
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(
            f"Received genotype names {clashes} more than once; expected "
            "each once (searches may not be named random_<k>). Rename the "
            "--nas_methods entry, e.g. darts_1st:method=darts;arch_order=first."
        )
    for entry in protocol.searches:
        try:
            protocol.search_config(base, entry)
        except ValueError as error:
            raise ValueError(f"Search {entry.describe()!r} is not a valid "
                             f"config: {error}") from None
    grid = protocol.grid(workdir)
    for cell in grid.cells():
        try:
            grid.config_for(base, cell)
        except ValueError as error:
            raise ValueError(
                f"Training run {cell.method.name!r} (seed {cell.seed}, "
                f"--nas_train={train_budget!r}) is not a valid config: "
                f"{error}") from None
    return protocol


# ---------------------------------------------------------------- running


def run_searches(protocol: Protocol, base, workdir: str,
                 search_fn=None) -> Dict[str, str]:
    """Runs every unfinished search; {name: `done` | `skipped`}.

    Args:
      protocol: the `Protocol`.
      base: the config every search starts from.
      workdir: the protocol's directory.
      search_fn: `(config, search_workdir) -> Genotype`; default
        `search_lib.run_search` (tests may pass a stand-in).
    """
    statuses = {}
    for entry in protocol.searches:
        directory = os.path.join(workdir, SEARCH_DIR, entry.name)
        if os.path.exists(os.path.join(directory, SUMMARY_FILE)):
            logging.info("Search %s finished before; skipped.", entry.name)
            statuses[entry.name] = "skipped"
            continue
        logging.info("Search %s: %s", entry.name, entry.describe())
        if search_fn is None:
            # Imported here: a rerun with every search done (or a report)
            # needs no supernet code.
            from lfm_tf import search_lib  # pylint: disable=g-import-not-at-top
            search_fn = search_lib.run_search
        search_fn(protocol.search_config(base, entry), directory)
        statuses[entry.name] = "done"
        benchmark_grid._clear_session()  # pylint: disable=protected-access
    return statuses


def draw_random_genotypes(protocol: Protocol, base, workdir: str):
    """Writes the random genotypes not drawn yet; returns their paths.

    They sample the space the searches searched (the search budget's
    `search_primitives` and `search_steps`). A file already there is kept
    as it is: runs may have trained it.
    """
    search = protocol.search_config(base, protocol.searches[0]).search
    paths = []
    for k in range(protocol.num_random):
        path = genotype_path(workdir, f"{RANDOM_PREFIX}{k}", protocol)
        if not os.path.exists(path):
            genotypes.random_genotype(
                k, steps=search.search_steps,
                primitives=search.primitives).save(path)
        paths.append(path)
    return paths


def count_parameters(genotype, config, num_classes, input_shape) -> int:
    """Trainable parameters of `genotype`'s network under `config`'s width
    and cells, without the auxiliary head (training-only; DARTS reports
    sizes without it)."""
    # Imported here: a report from cached counts needs no TensorFlow.
    from lfm_tf.nas import derived_network  # pylint: disable=g-import-not-at-top

    classifier = derived_network.build_derived_classifier(
        genotype, num_classes, input_shape, channels=config.model.width,
        layers=config.model.cells, auxiliary_weight=0.0)
    return int(sum(np.prod(v.shape) for v in classifier.trainable_variables))


def update_parameter_counts(protocol: Protocol, base, workdir: str):
    """Counts, into parameters.json, the genotypes not counted yet that
    have a finished run (whose export_info.json gives the classes and the
    input shape). Returns {name: count}."""
    path = os.path.join(workdir, PARAMETERS_FILE)
    counts = _read_json(path) or {}
    grid = protocol.grid(workdir)
    changed = False
    for cell in grid.cells():
        name = cell.method.name
        info = _read_json(os.path.join(workdir, cell.relative_dir(),
                                       "export_info.json"))
        if name in counts or info is None:
            continue
        config = grid.config_for(base, cell)
        counts[name] = count_parameters(
            config.model.genotype, config, len(info["class_names"]),
            tuple(info["input_shape"]))
        changed = True
    if changed:
        fileio.write_text(path, json.dumps(counts, indent=2, sort_keys=True))
    return counts


def run_protocol(protocol: Protocol, base, workdir: str,
                 search_fn=None, train_fn=None):
    """Searches, draws, trains and counts what is not done yet.

    Returns:
      {"searches": {name: status}, "runs": [benchmark_grid.CellResult]}.
    """
    searches = run_searches(protocol, base, workdir, search_fn)
    draw_random_genotypes(protocol, base, workdir)
    results = benchmark_grid.run_grid(protocol.grid(workdir), base, workdir,
                                      train_fn)
    update_parameter_counts(protocol, base, workdir)
    return {"searches": searches, "runs": results}


# ----------------------------------------------------------------- report


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _origin(protocol, name):
    for entry in protocol.searches:
        if entry.name == name:
            return f"search: {entry.describe()}"
    return f"random (seed {name[len(RANDOM_PREFIX):]})"


def _mean_std(values) -> Tuple[Optional[float], Optional[float], int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std, len(values)


def _percent(mean, std):
    if mean is None:
        return "–"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def report_fields(protocol: Protocol, workdir: str):
    """`row -> extra columns` for `benchmark_grid.write_report`: where the
    genotype came from, its parameters, its search's wall time."""
    counts = _read_json(os.path.join(workdir, PARAMETERS_FILE)) or {}

    def fields(row):
        name = row["method"]
        summary = _read_json(os.path.join(workdir, SEARCH_DIR, name,
                                          SUMMARY_FILE)) or {}
        wall = summary.get("wall_seconds")
        return {"genotype_origin": _origin(protocol, name),
                "parameters": counts.get(name),
                "search_wall_time_s": None if wall is None else round(wall, 1)}

    return fields


def report_markdown(protocol: Protocol, workdir: str):
    """`(grid, rows, machine, title) -> str` for `write_report`: one row per
    genotype with its parameters and accuracies, the best test mean in
    bold, the random baseline's mean, the cells themselves."""

    def render(grid, rows, machine, title):
        stats = {}
        for method in grid.methods:
            mine = [r for r in rows
                    if r["method"] == method.name and r["status"] == "done"]
            stats[method.name] = (
                _mean_std([r["test_accuracy"] for r in mine]),
                _mean_std([r["best_val_accuracy"] for r in mine]),
                _mean_std([r["wall_time_s"] for r in mine])[0],
                mine[0] if mine else next(
                    r for r in rows if r["method"] == method.name))
        means = [s[0][0] for s in stats.values() if s[0][0] is not None]
        top = round(100 * max(means), 2) if means else None
        lines = [
            f"# {title}", "",
            "Each genotype trained from scratch with the same budget; test "
            "accuracy (%) mean ± sample std over seeds (n runs), best mean "
            "in **bold**. Each run selects its epoch on the validation "
            "(meta) split and reads the test split once; the searches never "
            "read it. Parameters: the trained network without its auxiliary "
            "head.", "",
            "| genotype | origin | parameters | test accuracy (%) | best "
            "validation accuracy (%) | search wall time (s) | training wall "
            "time per run (s) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, ((mean, std, n), (vmean, vstd, _), wall, row) in \
                stats.items():
            test = _percent(mean, std)
            if mean is not None and round(100 * mean, 2) == top:
                test = f"**{test}**"
            params = row.get("parameters")
            search_wall = row.get("search_wall_time_s")
            lines.append(
                f"| {name} | {row['genotype_origin']} | "
                f"{'–' if params is None else f'{params:,}'} | "
                f"{test} ({n}) | {_percent(vmean, vstd)} | "
                f"{'–' if search_wall is None else f'{search_wall:.0f}'} | "
                f"{'–' if wall is None else f'{wall:.0f}'} |")
        random_means = [stats[n][0][0] for n in stats
                        if n.startswith(RANDOM_PREFIX)
                        and stats[n][0][0] is not None]
        if random_means:
            mean, std, n = _mean_std(random_means)
            lines += ["", f"Random baseline: {_percent(mean, std)} test "
                      f"accuracy, mean ± std over {n} random genotypes."]
        lines += benchmark_grid.status_lines(rows, machine) + [
            "",
            f"Search budget (every search): "
            f"{protocol.search_budget.describe()}.",
            f"Training budget (every genotype): "
            f"{protocol.train_budget.describe()}.",
            f"Seeds: {', '.join(map(str, grid.seeds))}.",
            "", "Genotypes (normal | reduce cell, (op, input state)):", "",
        ]
        for name in stats:
            path = genotype_path(workdir, name, protocol)
            if os.path.exists(path):
                genotype = genotypes.load(path)
                lines.append(f"- {name}: {list(genotype.normal)} | "
                             f"{list(genotype.reduce)}")
            else:
                lines.append(f"- {name}: not searched yet")
        failed = [r for r in rows if r["status"] == "failed"]
        if failed:
            lines += ["", "Failed runs (retried on the next run):", ""]
            lines += [f"- `{r['workdir']}`: {r['error']}" for r in failed]
        return "\n".join(lines) + "\n"

    return render


def write_report(protocol: Protocol, workdir: str, title: str):
    """results.csv, results.md and plots/ of the protocol so far."""
    return benchmark_grid.write_report(
        protocol.grid(workdir), workdir, title=title,
        extra_fields=report_fields(protocol, workdir),
        markdown_fn=report_markdown(protocol, workdir))
