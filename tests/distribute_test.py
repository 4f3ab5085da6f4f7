"""tf.distribute: N replicas compute what one device computes.

Each check runs in a fresh interpreter (this file with `--child=NAME`),
because logical CPU devices can only be configured before TensorFlow
initialises. The child prints one JSON line of measurements; the test
asserts on them.

BatchNorm keeps per-replica batch statistics (README "Scale and resume"), so
the one-device equivalence checks replace it with the identity in the child:
what they test is the all-reduce of the inner gradients, the meta-batch
gather and the scaling of the outer gradients.
"""

import json
import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32, reductions in a different order: relative to the largest entry.
RTOL = 1e-5


def _child(name, *args, timeout=600):
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--child={name}",
         *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        check=False)
    if result.returncode != 0:
        raise AssertionError(result.stderr[-4000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


class MirroredEquivalenceTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.results = _child("equivalence")

    def test_hypergradients_match_one_device(self):
        for case in ("mwnet", "lfm", "lfm_finite_difference",
                     "lfm_positional", "lfm_shared",
                     "lfm_shared_first_order"):
            for i, error in enumerate(self.results[case]["hypergradients"]):
                self.assertLess(error, RTOL, f"{case} gradient {i}")

    def test_one_step_matches_one_device(self):
        for case in ("erm", "mwnet", "lfm", "lfm_shared",
                     "lfm_shared_first_order"):
            worst = self.results[case]["variables"]
            self.assertLess(worst["error"], RTOL, f"{case}: {worst}")

    def test_batch_normalisations_match_one_device(self):
        # L2RW's sum and `batch_mean`'s mean run over the global batch.
        for case in ("l2rw", "lfm_batch_mean", "mwnet_batch_mean"):
            worst = self.results[case]["variables"]
            self.assertLess(worst["error"], RTOL, f"{case}: {worst}")
        for case in ("lfm_batch_mean", "mwnet_batch_mean"):
            for i, error in enumerate(self.results[case]["hypergradients"]):
                self.assertLess(error, RTOL, f"{case} gradient {i}")

    def test_clipping_acts_on_the_summed_gradient(self):
        self.assertLess(self.results["clip_summed"], RTOL)
        # What LFM-DR's r and V optimizers did before: the check has teeth.
        self.assertGreater(self.results["clip_keras"], 0.1)

    def test_deep_bilevel_splits_match_one_device(self):
        # The replicas cut the one-device splits; with BatchNorm too (its
        # statistics are per split either way).
        for case in ("dbl", "dbl_meta", "dbl_batchnorm"):
            worst = self.results[case]["variables"]
            self.assertLess(worst["error"], RTOL, f"{case}: {worst}")

    def test_meta_net_step_within_adam_bound(self):
        # Adam's first step is lr * g / (|g| + eps): for entries whose
        # gradient is ~0 (a dead hidden unit) float32 reduction order can flip
        # its sign, so a step may differ by up to 2 * lr there (measured,
        # run to run: 1e-10, or 1.8% of one bias); the gradients themselves
        # match (above).
        self.assertLessEqual(self.results["mwnet"]["meta_net_abs"],
                             2 * 1e-3)

    def test_batchnorm_copies_stay_equal(self):
        self.assertEqual(self.results["batchnorm_replica_spread"], 0.0)

    def test_checkpoint_moves_between_strategies(self):
        self.assertEqual(self.results["mirrored_to_default"], 0.0)
        self.assertEqual(self.results["default_to_mirrored"], 0.0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiWorkerTest(tf.test.TestCase, parameterized.TestCase):

    def _run_two_workers(self, module, *flags):
        """Runs `module` as 2 workers on 127.0.0.1 sharing one workdir.

        Returns:
          (workdir, [each worker's artefact directory]).
        """
        ports = [_free_port(), _free_port()]
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        # One workdir, as on a shared file system: the chief writes it, the
        # other worker its own copy under workers/.
        workdir = self.get_temp_dir()
        processes = [subprocess.Popen(
            [sys.executable, "-m", module, *flags, "--strategy=multi_worker",
             f"--workdir={workdir}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=dict(os.environ, TF_CONFIG=json.dumps(
                {"cluster": cluster,
                 "task": {"type": "worker", "index": index}})))
            for index in range(2)]
        for process in processes:
            _, stderr = process.communicate(timeout=600)
            self.assertEqual(process.returncode, 0, stderr[-4000:])
        self.assertEqual(os.listdir(os.path.join(workdir, "workers")),
                         ["worker-1"])
        return workdir, [workdir,
                         os.path.join(workdir, "workers", "worker-1")]

    def _assert_only_chief_checkpoints(self, backup, worker_backup):
        # The other worker's scratch writes are gone, and it keeps none.
        names = os.listdir(backup)
        self.assertNotEmpty(names)
        self.assertTrue(all(n.startswith("ckpt-") for n in names), names)
        self.assertFalse(os.path.exists(worker_backup))

    # LRW-Hard: its ERM phase and re-split run on each worker before the
    # strategy's MW-Net phase, and must give both workers the same split.
    @parameterized.parameters("lfm", "lrw_hard")
    def test_two_workers_train_to_the_end_and_agree(self, method):
        workdir, outdirs = self._run_two_workers(
            "pipelines.train", "--flagfile=configs/smoke/train_lfm.flags",
            f"--method={method}", "--steps_per_epoch=3", "--batch_size=32",
            "--meta_batch_size=24")
        weights = []
        for outdir in outdirs:
            with open(os.path.join(outdir, "metrics.json")) as f:
                self.assertLen(json.load(f)["val_accuracy_per_epoch"], 1)
            arrays = {}
            with h5py.File(os.path.join(outdir,
                                        "classifier.weights.h5")) as f:
                f.visititems(
                    lambda n, o, a=arrays: a.__setitem__(n, np.array(o))
                    if isinstance(o, h5py.Dataset) else None)
            weights.append(arrays)
        self.assertNotEmpty(weights[0])
        for name in weights[0]:
            self.assertAllEqual(weights[0][name], weights[1][name], msg=name)
        self._assert_only_chief_checkpoints(
            os.path.join(workdir, "backup"),
            os.path.join(outdirs[1], "backup"))

    def test_two_workers_search_and_agree(self):
        workdir, outdirs = self._run_two_workers(
            "pipelines.search",
            "--flagfile=configs/smoke/search_lfm_darts.flags",
            "--batch_size=32", "--meta_batch_size=32")
        results = []
        for outdir in outdirs:
            with open(os.path.join(outdir, "stage_0", "result.json")) as f:
                results.append(json.load(f))
        self.assertEqual(results[0]["genotype"], results[1]["genotype"])
        for key in ("arch_normal", "arch_reduce"):
            self.assertAllEqual(results[0][key], results[1][key])
        # α moved from its uniform start, so the agreement is not vacuous.
        normal = np.asarray(results[0]["arch_normal"])
        self.assertGreater(np.abs(normal - normal.mean(axis=1,
                                                       keepdims=True)).max(),
                           1e-6)
        self.assertTrue(os.path.exists(os.path.join(workdir,
                                                    "genotype.json")))
        self._assert_only_chief_checkpoints(
            os.path.join(workdir, "stage_0", "backup"),
            os.path.join(outdirs[1], "stage_0", "backup"))


class ArtefactDirTest(tf.test.TestCase):

    def _strategy(self, cluster, task_type, task_id):
        # is_chief reads only the strategy's cluster resolver.
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cluster), task_type=task_type,
            task_id=task_id)
        return type("Strategy", (), {"cluster_resolver": resolver})()

    def test_only_the_chief_writes_workdir(self):
        from lfm_tf import distribute  # pylint: disable=g-import-not-at-top
        workers = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
        self.assertEqual(distribute.artefact_dir(
            "/w", self._strategy(workers, "worker", 0)), "/w")
        self.assertEqual(distribute.artefact_dir(
            "/w", self._strategy(workers, "worker", 1)),
            "/w/workers/worker-1")
        # With a chief task, worker 0 is not the chief.
        with_chief = dict(workers, chief=["127.0.0.1:3"])
        self.assertEqual(distribute.artefact_dir(
            "/w", self._strategy(with_chief, "chief", 0)), "/w")
        self.assertEqual(distribute.artefact_dir(
            "/w", self._strategy(with_chief, "worker", 0)),
            "/w/workers/worker-0")
        self.assertEqual(distribute.artefact_dir(
            "/w", tf.distribute.get_strategy()), "/w")


class MixedPrecisionTest(tf.test.TestCase):

    def test_bfloat16_smoke_run_trains(self):
        import keras  # pylint: disable=g-import-not-at-top
        from lfm_tf import train_lib  # pylint: disable=g-import-not-at-top

        captured = {}

        class Capture(keras.callbacks.Callback):

            def on_train_end(self, logs=None):
                captured["model"] = self.model
                captured["logs"] = dict(logs or {})

        config = _config("lfm", augment=True, steps_per_epoch=3,
                         mixed_precision="mixed_bfloat16")
        metrics = train_lib.train_and_evaluate(
            config, self.get_temp_dir(), extra_callbacks=[Capture()])
        model = captured["model"]
        for name in ("loss", "w2_loss", "val_loss"):
            self.assertTrue(np.isfinite(captured["logs"][name]), name)
        self.assertTrue(np.isfinite(metrics["test_accuracy"]))
        self.assertEqual({v.dtype for v in model.trainable_variables},
                         {"float32"})
        self.assertEqual(model.classifier.trunk.layers[1].compute_dtype,
                         "bfloat16")
        self.assertEqual(model.classifier.head.compute_dtype, "float32")
        # The policy does not leak into models built afterwards.
        self.assertEqual(keras.config.dtype_policy().name, "float32")


# ---------------------------------------------------------------- children


def _relative_error(expected, actual):
    expected, actual = np.asarray(expected), np.asarray(actual)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    return float(np.max(np.abs(expected - actual))) / scale


def _config(method, **overrides):
    from lfm_tf import config as config_lib  # pylint: disable=g-import-not-at-top
    values = dict(
        source="digits", num_meta_per_class=5, batch_size=32,
        meta_batch_size=24, backbone="small_cnn", width=8, method=method,
        augment=False, steps_per_epoch=1)
    values.update(overrides)
    return config_lib.ExperimentConfig().replace(**values)


def _fresh_stream(config, data):
    """The seeded training stream from its start (a reused dataset object
    would reshuffle: its second iteration is the second epoch)."""
    from lfm_tf import train_lib  # pylint: disable=g-import-not-at-top
    return train_lib._train_dataset(config, data)  # pylint: disable=protected-access


def _build(strategy, config, data):
    import keras  # pylint: disable=g-import-not-at-top
    from lfm_tf.methods import factory  # pylint: disable=g-import-not-at-top
    keras.utils.set_random_seed(0)
    with strategy.scope():
        return factory.compile_method(
            factory.build_method(config, data["facts"]), config)


def _hypergradients(strategy, config, data):
    """The outer gradients of the first batch, summed over replicas."""
    from lfm_tf import distribute  # pylint: disable=g-import-not-at-top
    model = _build(strategy, config, data)
    batch = next(iter(strategy.experimental_distribute_dataset(
        _fresh_stream(config, data))))
    method = config.method.method

    def replica_fn(element):
        train = element["train"]
        meta = distribute.gather_batch(element["meta"])
        if method == "mwnet":
            return model.meta_gradient(train, meta)[0]
        return model.hypergradients(train, meta)[-1]

    @tf.function
    def run(element):
        grads = strategy.run(replica_fn, args=(element,))
        return [strategy.reduce("SUM", g, axis=None) for g in grads]

    return [g.numpy() for g in run(batch)]


def _after_steps(strategy, config, data, steps):
    model = _build(strategy, config, data)
    model.fit(_fresh_stream(config, data), epochs=1, steps_per_epoch=steps,
              verbose=0, shuffle=False)
    return model, [np.array(v) for v in model.variables]


def _equivalence():
    import keras  # pylint: disable=g-import-not-at-top
    from lfm_tf import checkpointing  # pylint: disable=g-import-not-at-top
    from lfm_tf import train_lib  # pylint: disable=g-import-not-at-top
    from lfm_tf.models import layers  # pylint: disable=g-import-not-at-top

    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {}

    # With BatchNorm: its statistics are averaged, so copies stay equal.
    config = _config("lfm")
    data = train_lib.prepare_data(config)
    model, _ = _after_steps(two, config, data, 2)
    spread = 0.0
    for variable in model.non_trainable_variables:
        copies = [np.array(c) for c in two.experimental_local_results(
            variable.value)]
        spread = max(spread, max(float(np.max(np.abs(c - copies[0])))
                                 for c in copies))
    results["batchnorm_replica_spread"] = spread

    # A checkpoint written under one strategy restores under another.
    for source, target, key in ((two, tf.distribute.get_strategy(),
                                 "mirrored_to_default"),
                                (tf.distribute.get_strategy(), two,
                                 "default_to_mirrored")):
        trained, values = _after_steps(source, config, data, 1)
        manager = checkpointing.Manager(os.path.join(
            os.environ.get("TEST_TMPDIR", "/tmp"), f"ckpt_{os.getpid()}_{key}"))
        path = manager.save(trained, {"global_step": 1})
        fresh = _build(target, config, data)
        manager.restore(fresh, path)
        results[key] = max(float(np.max(np.abs(a - np.array(v))))
                           for a, v in zip(values, fresh.variables))

    config = _config("dbl")
    results["dbl_batchnorm"] = _step_error(one, two, config,
                                           train_lib.prepare_data(config), 1)

    layers.BatchNorm = lambda name=None, **kwargs: keras.layers.Identity(
        name=name)
    cases = {
        "erm": ("erm", {}, 2),
        "mwnet": ("mwnet", {}, 1),
        "lfm": ("lfm", {}, 1),
        "lfm_finite_difference": ("lfm", dict(
            hypergradient="finite_difference"), 0),
        "lfm_positional": ("lfm", dict(weighting_mode="positional"), 0),
        # The main job's variant, exact and by the heads-only chain rule.
        "lfm_shared": ("lfm", dict(lfm_objective="shared",
                                   single_network=True), 1),
        "lfm_shared_first_order": ("lfm", dict(
            lfm_objective="shared", single_network=True,
            hypergradient="first_order"), 1),
        "l2rw": ("l2rw", {}, 1),
        "lfm_batch_mean": ("lfm", dict(weight_normalization="batch_mean"), 1),
        "mwnet_batch_mean": ("mwnet", dict(
            weight_normalization="batch_mean"), 1),
        "dbl": ("dbl", {}, 1),
        "dbl_meta": ("dbl", dict(dbl_validation="meta"), 1),
    }
    for case, (method, overrides, steps) in cases.items():
        config = _config(method, **overrides)
        data = train_lib.prepare_data(config)
        entry = {}
        if method in ("mwnet", "lfm"):
            entry["hypergradients"] = [
                _relative_error(a, b) for a, b in zip(
                    _hypergradients(one, config, data),
                    _hypergradients(two, config, data))]
        if steps:
            entry.update(_step_error(one, two, config, data, steps))
        results[case] = entry

    # r's and V's optimizers (LFM-DR) clip the gradient summed over
    # replicas; Keras' own `global_clipnorm` clips each replica's share.
    expected = _clipped_step(one, keras_clip=False)
    results["clip_summed"] = _relative_error(
        expected, _clipped_step(two, keras_clip=False))
    results["clip_keras"] = _relative_error(
        expected, _clipped_step(two, keras_clip=True))
    return results


def _clipped_step(strategy, keras_clip):
    """Adam's first moment after one step on a gradient of norm 30 clipped
    to 1, which the replicas hold in unequal shares (1/4 and 3/4)."""
    import keras  # pylint: disable=g-import-not-at-top
    from lfm_tf import distribute  # pylint: disable=g-import-not-at-top
    grad = tf.constant(np.linspace(-3.0, 3.0, 20) * 3.0, tf.float32)
    with strategy.scope():
        variable = tf.Variable(tf.zeros([20]))
        optimizer = keras.optimizers.Adam(
            0.1, global_clipnorm=1.0 if keras_clip else None)
        optimizer.build([variable])

    def replica_fn():
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        share = grad * ((0.5 + tf.cast(distribute.replica_id(), tf.float32))
                        / (replicas ** 2 / 2))
        grads = ([share] if keras_clip
                 else distribute.clip_by_global_norm([share], 1.0))
        optimizer.apply(grads, [variable])

    tf.function(lambda: strategy.run(replica_fn), autograph=False)()
    return np.array(optimizer.variables[2])


def _step_error(one, two, config, data, steps):
    """The worst variable after `steps` (meta-net weights aside)."""
    _, expected = _after_steps(one, config, data, steps)
    model, actual = _after_steps(two, config, data, steps)
    errors = [(_relative_error(a, b), v.path) for a, b, v in zip(
        expected, actual, model.variables)
              if a.dtype.kind == "f" and "meta_net" not in v.path]
    error, path = max(errors)
    return {"variables": {"error": error, "variable": path},
            "meta_net_abs": max(
                [float(np.max(np.abs(a - b))) for a, b, v in zip(
                    expected, actual, model.variables)
                 if "meta_net" in v.path] or [0.0])}


def _main(name):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, REPO)
    results = {"equivalence": _equivalence}[name]()
    sys.stdout.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    children = [a for a in sys.argv[1:] if a.startswith("--child=")]
    if children:
        _main(children[0].split("=", 1)[1])
    else:
        tf.test.main()
