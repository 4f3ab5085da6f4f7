"""The NAS protocol: searches vs random cells, each trained from scratch.

    python -m pipelines.nas_benchmark \
        --flagfile=configs/benchmark/cpu_nas.flags --workdir=runs/cpu_nas

Every `pipelines.train` / `pipelines.search` flag sets the base config; the
protocol's flags:

    --nas_methods           searches, e.g. darts,lfm_darts (or variants
                            name:method=darts;arch_order=first)
    --nas_search            the search budget of every search, field=value;...
    --nas_train             the training budget of every genotype
    --nas_random_genotypes  K random cells trained as the baseline (3)
    --nas_seeds             seeds of every training run

It searches into <workdir>/search/<method>/, draws the random cells into
<workdir>/genotypes/, trains every genotype in
<workdir>/runs/train/<genotype>/seed_<k>/ and writes results.csv, results.md
and plots/ (`lfm_tf/nas_protocol.py`). Rerunning the same command skips
finished work; --nas_report_only only rewrites the report.
"""

import os

from absl import app
from absl import flags
from absl import logging

from lfm_tf import nas_protocol
from pipelines import flags as flags_lib

FLAGS = flags.FLAGS


def define_nas_flags(flag_values=FLAGS):
    """The protocol's flags (idempotent)."""
    if "nas_methods" in flag_values:
        return
    flags.DEFINE_list(
        "nas_methods", ["darts", "lfm_darts"],
        "Searches: a search method, or name:field=value;field=value.",
        flag_values=flag_values)
    flags.DEFINE_string(
        "nas_search", "",
        "Search budget of every search: field=value;field=value (e.g. "
        "epochs=2;steps_per_epoch=60).", flag_values=flag_values)
    flags.DEFINE_string(
        "nas_train", "",
        "Training budget of every genotype: field=value;field=value (e.g. "
        "epochs=10;width=16;cells=5).", flag_values=flag_values)
    flags.DEFINE_integer(
        "nas_random_genotypes", 3,
        "Random genotypes (seeds 0..K-1) trained as the baseline.",
        flag_values=flag_values)
    flags.DEFINE_list("nas_seeds", ["0"], "Seeds of every training run.",
                      flag_values=flag_values)
    flags.DEFINE_bool(
        "nas_report_only", False,
        "Write results.csv/.md and plots from what is finished; search and "
        "train nothing.", flag_values=flag_values)
    flags.DEFINE_string("nas_title", "NAS protocol",
                        "Title of results.md.", flag_values=flag_values)


def protocol_from_flags(values=FLAGS):
    """(base config, `Protocol`) from parsed flags; ValueError if invalid."""
    base = flags_lib.config_from_flags(values=values)
    protocol = nas_protocol.parse_protocol(
        values.nas_methods, values.nas_search, values.nas_train,
        values.nas_random_genotypes, values.nas_seeds, base,
        values.workdir or "workdir")
    return base, protocol


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with flags_lib.exit_on_bad_input():
        base, protocol = protocol_from_flags()
    logging.info("NAS protocol: %d searches, %d random genotypes, %d seeds.",
                 len(protocol.searches), protocol.num_random,
                 len(protocol.seeds))
    if not FLAGS.nas_report_only:
        done = nas_protocol.run_protocol(protocol, base, FLAGS.workdir)
        searched = list(done["searches"].values())
        runs = [r.status for r in done["runs"]]
        print(f"Searches: {searched.count('done')} run, "
              f"{searched.count('skipped')} skipped (finished before).")
        print(f"Runs: {runs.count('done')} trained, {runs.count('skipped')} "
              f"skipped (finished before), {runs.count('failed')} failed.")
    report = nas_protocol.write_report(protocol, FLAGS.workdir,
                                       FLAGS.nas_title)
    with open(report["markdown"]) as f:
        print(f.read())
    print(f"Report written to {os.path.abspath(FLAGS.workdir)}: results.csv, "
          f"results.md, {len(report['plots'])} plots in plots/")


if __name__ == "__main__":
    flags_lib.define_flags()
    define_nas_flags()
    flags.mark_flag_as_required("workdir")
    app.run(main)
