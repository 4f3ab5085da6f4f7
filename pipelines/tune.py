"""KerasTuner search over any method's hyperparameters.

    python -m pipelines.tune --flagfile=configs/tune/digits_lfm.flags \
        --workdir=/tmp/lfm_tune

Rerunning the same command continues the search (finished trials are kept).
Writes `<workdir>/results/results.md` and `.csv` (trial, objective,
hyperparameters, best first) and `<workdir>/results/best.flags`, which
`python -m pipelines.train --flagfile=.../best.flags --workdir=...` trains
as is. `--export_best` then trains the best config and exports it. The
objective is validation accuracy; the test set is never read while tuning.

Distributed tuning is KerasTuner's: run the same command on a chief
(KERASTUNER_TUNER_ID=chief) and on workers (KERASTUNER_TUNER_ID=tuner0, ...)
with KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT set on all of them.
"""

import os

import keras
from absl import app
from absl import flags
from absl import logging

from lfm_tf import fileio
from lfm_tf import train_lib
from lfm_tf import tuning
from pipelines import flags as flags_lib

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Data errors surface while the tuner builds its first model, so the
    # whole run is inside.
    with flags_lib.exit_on_bad_input():
        _tune()


def _tune():
    base = flags_lib.config_from_flags()
    space = tuning.merge_space(base, FLAGS.tune_space)
    description = "\n".join(d.describe() for d in space)
    if FLAGS.print_space:
        print(description)
        return
    logging.info("Search space:\n%s", description)
    hypermodel = tuning.LfmHyperModel(base, space)
    tuner = tuning.make_tuner(
        FLAGS.tuner, hypermodel, FLAGS.workdir, max_trials=FLAGS.max_trials,
        executions_per_trial=FLAGS.executions_per_trial,
        seed=base.data.seed, max_epochs=base.train.epochs,
    )
    callbacks = []
    if FLAGS.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_accuracy", mode="max",
            patience=FLAGS.early_stopping_patience))
    tuner.search(callbacks=callbacks)
    if os.environ.get("KERASTUNER_TUNER_ID", "chief") != "chief":
        return  # Workers leave reporting to the chief.
    rows = tuning.results_rows(tuner)
    out = tuning.results_dir(FLAGS.workdir)
    fileio.write_text(os.path.join(out, "results.md"),
                      tuning.results_markdown(rows))
    fileio.write_text(os.path.join(out, "results.csv"),
                      tuning.results_csv(rows))
    best = tuning.best_config(tuner, hypermodel)
    best_flags = os.path.join(out, "best.flags")
    fileio.write_text(best_flags, tuning.to_flagfile(
        best, f"Best of {len(rows)} trials by val_accuracy "
              f"({rows[0]['val_accuracy']:.4f}); from pipelines.tune."))
    print(tuning.results_markdown(rows))
    print(f"Best flags: {best_flags}")
    if FLAGS.export_best:
        train_lib.train_and_evaluate(best, os.path.join(FLAGS.workdir, "best"))


if __name__ == "__main__":
    flags_lib.define_flags()
    flags_lib.define_tune_flags()
    flags.mark_flag_as_required("workdir")
    app.run(main)
