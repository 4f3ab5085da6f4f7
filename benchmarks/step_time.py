"""Seconds per training step and peak memory of every method, as ratios to ERM.

    python -m benchmarks.step_time --backbone=resnet32 --batch_size=100 \
        --steps=20

Each configuration runs in its own subprocess (so peak memory is its own) on
the same backbone, image size and batch of synthetic data, through the real
`model.fit` path. Reported per configuration: time to the first step
(tracing), mean seconds per step after warm-up, and peak memory: on a GPU
the allocator's peak, on the CPU the process's peak RSS above its RSS just
before training (model and data built). Runs unchanged on a GPU machine.
"""

from absl import app
from absl import flags

from benchmarks import harness

flags.DEFINE_string("backbone", "resnet32", "Classifier backbone.")
flags.DEFINE_integer("width", 16, "small_cnn width / WRN widen factor.")
flags.DEFINE_integer("image_size", 32, "Side of the synthetic images.")
flags.DEFINE_integer("batch_size", 100, "Training (and meta) batch size.")
flags.DEFINE_integer("steps", 20, "Timed steps after warm-up.")
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after the first.")
flags.DEFINE_string("encoder", "small_cnn", "V for the non-PS LFM rows.")
flags.DEFINE_list(
    "configs",
    "erm,l2rw,mwnet,lfm_exact,lfm_finite_difference,lfm_first_order,"
    "lfm_exact_ps,lfm_finite_difference_ps,lfm_first_order_ps",
    "Which rows to run.",
)
flags.DEFINE_string("run_one", None, "Internal: run one row and print JSON.")
FLAGS = flags.FLAGS

_ROWS = {
    "erm": dict(method="erm"),
    "focal": dict(method="focal"),
    "l2rw": dict(method="l2rw"),
    "mwnet": dict(method="mwnet"),
    "dbl": dict(method="dbl"),
    "penalty": dict(method="penalty"),
    "penalty_t5": dict(method="penalty", penalty_inner_steps=5),
    # LRW's second phase (its per-step cost); the first phase is ERM.
    "lrw_hard": dict(method="lrw_hard"),
    # Every step a meta-net and splitter step (K = 1): the worst case.
    "molere": dict(method="molere", molere_meta_every=1),
    "lfm_exact": dict(method="lfm", hypergradient="exact"),
    # The main job's variant (configs/train/digits_lfm.flags): one network,
    # B weighting both steps.
    "lfm_exact_sn_shared": dict(method="lfm", hypergradient="exact",
                                single_network=True, lfm_objective="shared"),
    "lfm_finite_difference_sn_shared": dict(
        method="lfm", hypergradient="finite_difference", single_network=True,
        lfm_objective="shared"),
    "lfm_first_order_sn_shared": dict(
        method="lfm", hypergradient="first_order", single_network=True,
        lfm_objective="shared"),
    "lfm_finite_difference": dict(method="lfm",
                                  hypergradient="finite_difference"),
    "lfm_first_order": dict(method="lfm", hypergradient="first_order"),
    # The rows above compute the b_alignment diagnostic at step 0 (and
    # every 50th), an exact backward through stage 1; this row shows the
    # step and peak memory without it.
    "lfm_first_order_nodiag": dict(method="lfm", hypergradient="first_order",
                                   diagnostics_every=0),
    "lfm_exact_ps": dict(method="lfm", hypergradient="exact",
                         encoder="shared"),
    "lfm_finite_difference_ps": dict(method="lfm",
                                     hypergradient="finite_difference",
                                     encoder="shared"),
    "lfm_first_order_ps": dict(method="lfm", hypergradient="first_order",
                               encoder="shared"),
}


_SHARED = ("backbone", "width", "image_size", "batch_size", "steps",
           "warmup_steps", "encoder")


def _run_one(name):
    # pylint: disable=g-import-not-at-top
    import keras
    import numpy as np

    from lfm_tf import config as config_lib
    from lfm_tf.methods import factory
    # pylint: enable=g-import-not-at-top

    size, batch = FLAGS.image_size, FLAGS.batch_size
    overrides = dict(backbone=FLAGS.backbone, width=FLAGS.width,
                     batch_size=batch, meta_batch_size=batch,
                     encoder=FLAGS.encoder)
    overrides.update(_ROWS[name])
    config = config_lib.ExperimentConfig().replace(**overrides).validate()
    num_train, num_meta = 50 * batch, 10 * batch
    facts = factory.DataFacts(
        num_classes=10, input_shape=(size, size, 3), num_train=num_train,
        num_meta=num_meta, class_counts=np.full(10, num_train // 10),
        steps_per_epoch=100,
    )
    keras.utils.set_random_seed(0)
    model = factory.compile_method(factory.build_method(config, facts), config)
    element = harness.synthetic_element(size, batch, num_train, num_meta)
    result = harness.timed_fit(model, element, FLAGS.warmup_steps,
                               FLAGS.steps)
    return dict(result, name=name)


def main(argv):
    del argv
    if FLAGS.run_one:
        harness.emit(_run_one(FLAGS.run_one))
        return
    results = harness.run_rows(
        "benchmarks.step_time", FLAGS.configs, _ROWS,
        [f"--{f}={FLAGS[f].value}" for f in _SHARED])
    erm = next((r for r in results if r["name"] == "erm"), results[0])
    print(f"backbone={FLAGS.backbone} image={FLAGS.image_size} "
          f"batch={FLAGS.batch_size} device={erm['device']} "
          f"(ratios to {erm['name']})")
    print(harness.ratio_table(results, erm, width=28))
    print("command: python -m benchmarks.step_time " + " ".join(
        f"--{f}={FLAGS[f].value}" for f in _SHARED[:5]))


if __name__ == "__main__":
    app.run(main)
