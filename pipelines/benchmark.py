"""Runs a grid of methods x settings x seeds and reports it.

    python -m pipelines.benchmark --flagfile=configs/benchmark/smoke.flags \
        --workdir=/tmp/lfm_grid

Every `pipelines.train` flag sets the base config of all cells; the grid
flags vary it:

    --grid_methods   erm,focal,lfm_ps:method=lfm;encoder=shared
    --grid_settings  if100:imbalance_factor=100,flip40:noise_type=flip;noise_rate=0.4
    --grid_seeds     0,1,2

Each cell trains in <workdir>/runs/<setting>/<method>/seed_<k>/ (the usual
`pipelines.train` artefacts). Rerunning the same command skips finished cells
and resumes an interrupted one; a failed cell is recorded and the grid goes
on. The same command started N times trains N cells at once, each worker
taking the next cell no other worker holds; on a CPU, give each worker its
share of the cores (TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 for
two workers on two cores: 1.4x the steps per second of one worker, measured
on ResNet-8). With --grid_archive=<folder>, each finished cell's records are copied
there as it finishes (commit the folder), and a run in another checkout
restores them instead of training those cells again; with
--grid_save_progress (no training; safe beside running workers) each
unfinished cell's newest checkpoint goes there too, and the next worker to
claim that cell, in any checkout, resumes it. At the end (and with
--grid_report_only, without training) it writes <workdir>/results.csv,
results.md and plots/*.png; see `lfm_tf/benchmark_grid.py`.
"""

import os

from absl import app
from absl import flags
from absl import logging

from lfm_tf import benchmark_grid
from pipelines import flags as flags_lib

FLAGS = flags.FLAGS


def define_grid_flags(flag_values=FLAGS):
    """The grid flags (idempotent)."""
    if "grid_methods" in flag_values:
        return
    flags.DEFINE_list(
        "grid_methods", [],
        "Methods or variants: name, or name:field=value;field=value.",
        flag_values=flag_values)
    flags.DEFINE_list(
        "grid_settings", [],
        "Settings: name:field=value;field=value (e.g. "
        "if100:imbalance_factor=100).", flag_values=flag_values)
    flags.DEFINE_list("grid_seeds", ["0"], "Seeds of every cell.",
                      flag_values=flag_values)
    flags.DEFINE_list(
        "grid_first", [],
        "Methods (names from --grid_methods) whose cells train first, at "
        "every seed, before any other method's; the default order is "
        "seed-major.", flag_values=flag_values)
    flags.DEFINE_list(
        "grid_compare", [],
        "Methods under test (names from --grid_methods): the report gives "
        "each one's test accuracy minus each --grid_controls arm's, paired "
        "by seed, and says in words where it loses.",
        flag_values=flag_values)
    flags.DEFINE_list(
        "grid_controls", [],
        "Control methods (names from --grid_methods) the --grid_compare "
        "arms are compared with, e.g. step-matched ERM, an ablation, the "
        "loss-only baselines.", flag_values=flag_values)
    flags.DEFINE_bool(
        "grid_report_only", False,
        "Write results.csv/.md and plots from the finished cells; train "
        "nothing.", flag_values=flag_values)
    flags.DEFINE_string("grid_title", "Benchmark grid",
                        "Title of results.md.", flag_values=flag_values)
    flags.DEFINE_string(
        "grid_archive", None,
        "Folder (meant to be committed) of each finished cell's records "
        "(config.json, cell.json, metrics.json): every cell that finishes "
        "is copied there, and a later run, even in a fresh clone, restores "
        "the cells that ran the same configuration instead of training "
        "them.", flag_values=flag_values)
    flags.DEFINE_bool(
        "grid_save_progress", False,
        "Copy each unfinished cell's newest whole-state checkpoint and "
        "best weights into --grid_archive (<cell>/progress/, replaced "
        "whole), safe while workers train; train nothing. Commit it "
        "before a session or machine ends: the worker that next claims "
        "the cell, in any checkout, resumes from it.",
        flag_values=flag_values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with flags_lib.exit_on_bad_input():
        base = flags_lib.config_from_flags()
        grid = benchmark_grid.parse_grid(
            FLAGS.grid_methods, FLAGS.grid_settings, FLAGS.grid_seeds, base)
        # Names checked up front, before hours of training.
        grid.training_order(FLAGS.grid_first)
        grid.check_comparison(FLAGS.grid_compare, FLAGS.grid_controls)
    logging.info("Grid: %d methods x %d settings x %d seeds = %d cells.",
                 len(grid.methods), len(grid.settings), len(grid.seeds),
                 len(grid.cells()))
    if FLAGS.grid_save_progress:
        if not FLAGS.grid_archive:
            raise app.UsageError(
                "Received --grid_save_progress without --grid_archive; "
                "expected the archive folder the progress goes to. Add "
                "--grid_archive=<folder> (the flagfile's, to resume there).")
        saved = benchmark_grid.save_progress(grid, base, FLAGS.workdir,
                                             FLAGS.grid_archive)
        print(f"Progress of {saved} unfinished cells archived in "
              f"{FLAGS.grid_archive}.")
        return
    if FLAGS.grid_report_only:
        if FLAGS.grid_archive:
            benchmark_grid.restore_grid(grid, base, FLAGS.workdir,
                                        FLAGS.grid_archive)
    else:
        results = benchmark_grid.run_grid(grid, base, FLAGS.workdir,
                                          archive=FLAGS.grid_archive,
                                          first=FLAGS.grid_first)
        counts = {s: sum(r.status == s for r in results)
                  for s in ("done", "skipped", "busy", "failed")}
        print(f"Cells: {counts['done']} trained, {counts['skipped']} "
              f"skipped (finished before), {counts['busy']} left to other "
              f"workers, {counts['failed']} failed.")
    report = benchmark_grid.write_report(
        grid, FLAGS.workdir, title=FLAGS.grid_title,
        compare=FLAGS.grid_compare, controls=FLAGS.grid_controls)
    with open(report["markdown"]) as f:
        print(f.read())
    print(f"Report written to {os.path.abspath(FLAGS.workdir)}: results.csv, "
          f"results.md, {len(report['plots'])} plots in plots/")


if __name__ == "__main__":
    flags_lib.define_flags()
    define_grid_flags()
    flags.mark_flag_as_required("workdir")
    app.run(main)
