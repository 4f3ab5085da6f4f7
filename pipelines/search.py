"""Searches a cell with DARTS, P-DARTS, LFM-DARTS or LFM-PDARTS.

    python -m pipelines.search --flagfile=configs/search/darts_cifar10.flags \
        --workdir=/tmp/darts_search

Writes genotype.json (after every epoch, and the final one), per-stage
checkpoints (rerun the same command to resume), TensorBoard logs and
search_summary.json under --workdir, then prints the genotype and the
command that trains it from scratch.
"""

from absl import app
from absl import flags

from lfm_tf import search_lib
from pipelines import flags as flags_lib

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    with flags_lib.exit_on_bad_input():
        config = flags_lib.config_from_flags()
        genotype = search_lib.run_search(config, FLAGS.workdir)
    print(f"Genotype: {genotype.to_json()}")
    print("Train it from scratch with:\n  "
          + search_lib.train_command(config, FLAGS.workdir))


if __name__ == "__main__":
    flags_lib.define_flags()
    flags.mark_flag_as_required("workdir")
    app.run(main)
