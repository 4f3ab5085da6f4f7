"""Trains a classifier with any reweighting method.

    python -m pipelines.train --flagfile=configs/train/smoke_lfm.flags \
        --workdir=/tmp/lfm_run

Writes config.json, splits.npz, TensorBoard logs, the best-on-validation
checkpoint, metrics.json (test read once, at the end) and the classifier as a
SavedModel under --workdir.
"""

from absl import app
from absl import flags
from absl import logging

from lfm_tf import train_lib
from pipelines import flags as flags_lib

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with flags_lib.exit_on_bad_input():
        config = flags_lib.config_from_flags()
        metrics = train_lib.train_and_evaluate(config, FLAGS.workdir)
    logging.info("metrics: %s", metrics)
    print(f"Artefacts written to {FLAGS.workdir}: config.json, splits.npz, "
          "metrics.json, checkpoints/, logs/, saved_model/")


if __name__ == "__main__":
    flags_lib.define_flags()
    flags.mark_flag_as_required("workdir")
    app.run(main)
