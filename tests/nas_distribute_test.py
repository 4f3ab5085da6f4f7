"""Architecture search under tf.distribute: N replicas step as one device.

One training step of DARTS (second order) and of LFM-DARTS on a supernet
smaller than `tests/methods/darts_test.py`'s (1 node, 4 candidate ops incl.
a separable conv and a max pool, whose second derivative TF's own kernel got
wrong in LFM-DARTS' hypergradient (operations.max_pool_3x3); 3 cells, 4
channels, 8x8 images; 2 nodes took 11 minutes to trace here for the same
check), run by `MirroredStrategy` over 2 logical
CPUs and by one device on the same global batch; α, the Adam moments of α
(they hold α's processed gradient, which Adam's first step, about
lr * sign(g), would hide), r and every supernet weight must agree. A cheap
check of α's optimizer alone (clip and decay act on the summed gradient)
runs first.

The checks run in a fresh interpreter (this file with `--child`), because
logical CPU devices can only be configured before TensorFlow initialises.
BatchNorm normalises per replica (README "Scale and resume"), so the child
replaces it with the identity: what is tested is the all-reduce of the
virtual steps' gradients, the meta batch and the reduction of α's gradient.
Tracing a second-order supernet step is slow, hence one step per strategy.
"""

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32, reductions in another order: relative to each variable's largest
# entry (measured: below 1e-6; the per-replica code is off by 1e-2 to 1).
RTOL = 1e-5
CLASSES, SIDE, BATCH = 3, 8, 4
PRIMITIVES = "none,max_pool_3x3,skip_connect,sep_conv_3x3"


class NasMirroredEquivalenceTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child"], cwd=REPO,
            capture_output=True, text=True, timeout=1200, check=False)
        if result.returncode != 0:
            raise AssertionError(result.stderr[-4000:])
        cls.results = json.loads(result.stdout.strip().splitlines()[-1])

    def _assert_close(self, case):
        worst = self.results[case]
        self.assertGreater(worst["compared"], 0)
        self.assertLess(worst["error"], RTOL, f"{case}: {worst}")

    def test_arch_step_clips_and_decays_the_summed_gradient(self):
        self._assert_close("arch_step")

    def test_darts_second_order_step_matches_one_device(self):
        self._assert_close("darts")

    def test_lfm_darts_step_matches_one_device(self):
        self._assert_close("lfm_darts")

    def test_search_pipeline_matches_one_device(self):
        # `pipelines.search`'s run_search under the strategy: 2 steps of
        # LFM-DARTS through the input pipeline, fit and the checkpoints.
        # α after two Adam steps moves by about lr * sign(g) per step
        # (measured here: equal to the bit), so this checks the wiring and
        # the gradients' signs; the step tests above check their values.
        self._assert_close("search_pipeline")
        self.assertEqual(self.results["search_pipeline"]["replicas"], [2])


# ---------------------------------------------------------------- children


def _relative_error(expected, actual):
    expected, actual = np.asarray(expected), np.asarray(actual)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    return float(np.max(np.abs(expected - actual))) / scale


def _compare(expected, actual):
    """The worst relative error over two `_values` lists, and where."""
    assert len(expected) == len(actual), ([p for p, _ in expected],
                                          [p for p, _ in actual])
    error, path = max((_relative_error(a, b), path) for (path, a), (_, b)
                      in zip(expected, actual))
    return {"error": error, "variable": path, "compared": len(expected)}


def _arch_step(strategy):
    """α and its Adam moments after one clipped, decayed step whose
    gradient reaches the replicas in unequal shares."""
    from lfm_tf import config as config_lib  # pylint: disable=g-import-not-at-top
    from lfm_tf.methods import darts  # pylint: disable=g-import-not-at-top
    from lfm_tf.nas import architecture as architecture_lib  # pylint: disable=g-import-not-at-top
    from lfm_tf.nas import search_network  # pylint: disable=g-import-not-at-top

    space = search_network.full_space(2, PRIMITIVES.split(","))
    search = config_lib.SearchConfig(
        arch_learning_rate=0.1, arch_weight_decay=0.5,
        arch_grad_clip_norm=1.0)
    with strategy.scope():
        architecture = architecture_lib.Architecture(space, space, 2, 1.0,
                                                     seed=3)
        step = darts.ArchitectureStep(architecture, search)
    rng = np.random.default_rng(2)
    # Norm well above the clip, so clipping per replica would differ.
    grads = [tf.constant(rng.normal(scale=3.0, size=v.shape), tf.float32)
             for v in step.variables]

    def replica_fn():
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync
        if replicas == 1:
            share = 1.0
        else:
            # Unequal shares adding up to 1 (0.25 and 0.75 for 2 replicas).
            share = (0.5 + tf.cast(context.replica_id_in_sync_group,
                                   tf.float32)) / (replicas ** 2 / 2)
        step.apply([g * share for g in grads])

    tf.function(lambda: strategy.run(replica_fn), autograph=False)()
    return _values(step.variables + list(step.optimizer.variables))


def _values(variables):
    """[(path, array)] of the float variables, in order (a second build's
    auto-named layers may have other paths, so they pair by position)."""
    seen, out = set(), []
    for variable in variables:
        if id(variable) not in seen and variable.dtype in ("float32",
                                                           "float64"):
            seen.add(id(variable))
            out.append((variable.path, np.array(variable)))
    return out


def _search_config(method):
    from lfm_tf import config as config_lib  # pylint: disable=g-import-not-at-top
    # One node keeps the traces short; momentum and decay on, so the whole SGD
    # formula runs on the all-reduced gradients; no clipping (it would hide
    # a gradient's scale).
    return config_lib.ExperimentConfig().replace(
        method=method, search_channels=4, search_cells=3, search_steps=1,
        search_primitives=PRIMITIVES, w1_learning_rate=0.5,
        w2_learning_rate=0.5, lr_schedule="constant", weight_decay=3e-4,
        momentum=0.9, grad_clip_norm=None, weighting_mode="positional",
        meta_batch_size=BATCH, encoder="small_cnn", arch_order="second",
        arch_learning_rate=0.1, arch_weight_decay=1e-3).validate()


def _batch():
    rng = np.random.default_rng(0)
    image = lambda: tf.constant(rng.normal(size=(BATCH, SIDE, SIDE, 3)),
                                tf.float32)
    labels = tf.constant([0, 1, 2, 1])
    return {"train": {"image": image(), "label": labels,
                      "clean_label": labels,
                      "index": tf.constant([0, 1, 2, 3])},
            "meta": {"image": image(), "label": tf.constant([2, 0, 1, 0]),
                     "index": tf.constant([0, 1, 2, 3])}}


def _search_step(strategy, method):
    """Every float variable of the method after one step on the batch."""
    import keras  # pylint: disable=g-import-not-at-top
    from lfm_tf.methods import factory  # pylint: disable=g-import-not-at-top
    from lfm_tf.methods import search_factory  # pylint: disable=g-import-not-at-top

    facts = factory.DataFacts(num_classes=CLASSES,
                              input_shape=(SIDE, SIDE, 3), num_train=8,
                              num_meta=8, steps_per_epoch=1)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = search_factory.build_search_method(_search_config(method),
                                                   facts)
    rng = np.random.default_rng(1)
    # Logits far from uniform, so every op's weight matters.
    for variable in model.arch_step.variables:
        variable.assign(rng.normal(scale=0.5, size=variable.shape))
    batch = next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(_batch()).batch(BATCH))))
    # autograph=False: Keras runs train_step unconverted too (autograph
    # mis-converts the zero-argument super() of LFMDarts.train_step).
    tf.function(lambda b: strategy.run(model.train_step, args=(b,)),
                autograph=False)(batch)
    variables = list(model.variables) + list(
        model.arch_step.optimizer.variables)
    if method == "lfm_darts":
        variables += list(model.weighting_optimizer.variables)
    return _values(variables)


def _search_pipeline(strategy):
    """The replica counts the supernets were built under, and α
    (softmaxed) after `search_lib.run_search`: 2 LFM-DARTS steps on digits
    under `strategy`."""
    import tempfile  # pylint: disable=g-import-not-at-top
    from lfm_tf import distribute  # pylint: disable=g-import-not-at-top
    from lfm_tf import search_lib  # pylint: disable=g-import-not-at-top

    from lfm_tf.methods import search_factory  # pylint: disable=g-import-not-at-top

    make_strategy = distribute.make_strategy
    distribute.make_strategy = lambda *args, **kwargs: strategy
    build = search_factory.build_search_method
    replicas = []

    def recording_build(*args, **kwargs):
        replicas.append(tf.distribute.get_strategy().num_replicas_in_sync)
        return build(*args, **kwargs)

    search_factory.build_search_method = recording_build
    try:
        with tempfile.TemporaryDirectory() as workdir:
            search_lib.run_search(
                _search_config("lfm_darts").replace(
                    batch_size=BATCH, epochs=1, steps_per_epoch=2,
                    num_meta_per_class=2), workdir)
            with open(os.path.join(workdir, "stage_0", "result.json")) as f:
                result = json.load(f)
    finally:
        distribute.make_strategy = make_strategy
        search_factory.build_search_method = build
    return replicas, [("arch_normal", np.array(result["arch_normal"])),
                      ("arch_reduce", np.array(result["arch_reduce"]))]


def _child():
    import keras  # pylint: disable=g-import-not-at-top
    from lfm_tf.models import layers  # pylint: disable=g-import-not-at-top

    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {"arch_step": _compare(_arch_step(one), _arch_step(two))}
    layers.BatchNorm = lambda name=None, **kwargs: keras.layers.Identity(
        name=name)
    for method in ("darts", "lfm_darts"):
        expected = _search_step(one, method)
        actual = _search_step(two, method)
        results[method] = _compare(expected, actual)
    _, expected = _search_pipeline(one)
    replicas, actual = _search_pipeline(two)
    results["search_pipeline"] = _compare(expected, actual)
    results["search_pipeline"]["replicas"] = replicas
    return results


def _main():
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, REPO)
    sys.stdout.write(json.dumps(_child()) + "\n")


if __name__ == "__main__":
    if "--child" in sys.argv[1:]:
        _main()
    else:
        tf.test.main()
