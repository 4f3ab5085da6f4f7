"""Seconds per search step and peak memory: DARTS vs LFM-DARTS (with, without PS).

    python -m benchmarks.search_step --channels=8 --cells=5 --image_size=16 \
        --batch_size=16 --steps=5

On a GPU, the paper's supernet: --channels=16 --cells=8 --image_size=32
--batch_size=64. Each row runs in its own subprocess (its own peak memory)
on the same supernet and synthetic batch through `model.fit`. Reported:
time to the first step (tracing included), seconds per step after warm-up,
peak memory (GPU allocator peak, or CPU peak RSS above the RSS before
training), and ratios to second-order DARTS. Paper Table X: LFM-DARTS costs
~2.1x DARTS' memory without PS and ~1.1x with it.
"""

from absl import app
from absl import flags

from benchmarks import harness

flags.DEFINE_integer("channels", 8, "Supernet channels C.")
flags.DEFINE_integer("cells", 5, "Supernet cells.")
flags.DEFINE_integer("nodes", 4, "Intermediate nodes per cell.")
flags.DEFINE_string("primitives",
                    "none,max_pool_3x3,avg_pool_3x3,skip_connect,"
                    "sep_conv_3x3,sep_conv_5x5,dil_conv_3x3,dil_conv_5x5",
                    "Candidate ops.")
flags.DEFINE_integer("image_size", 16, "Side of the synthetic images.")
flags.DEFINE_integer("batch_size", 16, "Training and validation batch.")
flags.DEFINE_integer("steps", 5, "Timed steps after warm-up.")
flags.DEFINE_integer("warmup_steps", 1, "Untimed steps after the first.")
flags.DEFINE_list("configs", "darts_first,darts_second,lfm_darts,lfm_darts_ps",
                  "Which rows to run.")
flags.DEFINE_string("run_one", None, "Internal: run one row, print JSON.")
FLAGS = flags.FLAGS

_ROWS = {
    "darts_first": dict(method="darts", arch_order="first"),
    "darts_second": dict(method="darts", arch_order="second"),
    "lfm_darts": dict(method="lfm_darts", encoder="small_cnn"),
    "lfm_darts_ps": dict(method="lfm_darts", encoder="shared"),
}
_SHARED = ("channels", "cells", "nodes", "primitives", "image_size",
           "batch_size", "steps", "warmup_steps")


def _run_one(name):
    # pylint: disable=g-import-not-at-top
    import keras

    from lfm_tf import config as config_lib
    from lfm_tf.methods import factory
    from lfm_tf.methods import search_factory
    # pylint: enable=g-import-not-at-top

    size, batch = FLAGS.image_size, FLAGS.batch_size
    config = config_lib.ExperimentConfig().replace(
        search_channels=FLAGS.channels, search_cells=FLAGS.cells,
        search_steps=FLAGS.nodes, search_primitives=FLAGS.primitives,
        batch_size=batch, meta_batch_size=batch, weighting_mode="positional",
        **_ROWS[name]).validate()
    facts = factory.DataFacts(num_classes=10, input_shape=(size, size, 3),
                              num_train=50 * batch, num_meta=50 * batch,
                              steps_per_epoch=100)
    keras.utils.set_random_seed(0)
    model = search_factory.build_search_method(config, facts)
    element = harness.synthetic_element(size, batch, 50 * batch, 50 * batch)
    result = harness.timed_fit(model, element, FLAGS.warmup_steps,
                               FLAGS.steps)
    return dict(result, name=name)


def main(argv):
    del argv
    if FLAGS.run_one:
        harness.emit(_run_one(FLAGS.run_one))
        return
    results = harness.run_rows(
        "benchmarks.search_step", FLAGS.configs, _ROWS,
        [f"--{f}={FLAGS[f].value}" for f in _SHARED])
    base = next((r for r in results if r["name"] == "darts_second"),
                results[0])
    print(f"C={FLAGS.channels} cells={FLAGS.cells} nodes={FLAGS.nodes} "
          f"image={FLAGS.image_size} batch={FLAGS.batch_size} "
          f"device={base['device']} (ratios to {base['name']})")
    print(harness.ratio_table(results, base, width=14))
    print("command: python -m benchmarks.search_step " + " ".join(
        f"--{f}={FLAGS[f].value}" for f in _SHARED[:-1]))


if __name__ == "__main__":
    app.run(main)
