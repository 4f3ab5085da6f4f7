"""pipelines.train end to end on the embedded digits data, every method."""

import glob
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf import config as config_lib
from lfm_tf import train_lib
from lfm_tf.data import splits as splits_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _smoke_config(method, **overrides):
    """The values of configs/smoke/common.flags, as a config."""
    values = dict(
        source="digits", noise_type="uniform", noise_rate=0.4,
        num_meta_per_class=5, batch_size=32, meta_batch_size=25,
        backbone="small_cnn", width=8, epochs=1, steps_per_epoch=3,
        crop_padding=1, flip=False, w1_learning_rate=0.05,
        w2_learning_rate=0.05, method=method)
    values.update(overrides)
    return config_lib.ExperimentConfig().replace(**values)


class TrainLibTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters("erm", "focal", "class_balanced", "l2rw",
                              "mwnet", "dbl", "lfm")
    def test_every_method_writes_its_artefacts(self, method):
        workdir = os.path.join(self.get_temp_dir(), method)
        metrics = train_lib.train_and_evaluate(_smoke_config(method), workdir)
        for name in ("config.json", "splits.npz", "metrics.json",
                     "classifier.weights.h5", "export_info.json",
                     "checkpoints/best.weights.h5",
                     "saved_model/saved_model.pb"):
            self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)
        self.assertNotEmpty(glob.glob(os.path.join(workdir, "logs", "*")))
        with open(os.path.join(workdir, "config.json")) as f:
            self.assertEqual(json.load(f)["method"]["method"], method)
        self.assertBetween(metrics["test_accuracy"], 0.0, 1.0)
        self.assertLen(metrics["test_accuracy_per_class"], 10)
        self.assertAllClose(metrics["train_noise_rate"], 0.4, atol=0.05)
        loaded = tf.saved_model.load(os.path.join(workdir, "saved_model"))
        out = loaded.signatures["serving_default"](
            images=tf.zeros([2, 8, 8, 3], tf.uint8))
        self.assertEqual(out["probabilities"].shape, (2, 10))

    def test_splits_file_reproduces_the_run(self):
        workdir = self.get_temp_dir()
        config = _smoke_config("erm", steps_per_epoch=1)
        train_lib.train_and_evaluate(config, workdir)
        saved = splits_lib.Splits.load(os.path.join(workdir, "splits.npz"))
        again = train_lib.prepare_data(config)["splits"]
        self.assertAllEqual(saved.train_index, again.train_index)
        self.assertAllEqual(saved.train_labels, again.train_labels)

    def test_seed_and_deterministic_repeat_a_run_exactly(self):
        weights = []
        for i in range(2):
            workdir = os.path.join(self.get_temp_dir(), f"run{i}")
            train_lib.train_and_evaluate(
                _smoke_config("lfm", deterministic=True, steps_per_epoch=3),
                workdir)
            with h5py.File(os.path.join(workdir,
                                        "classifier.weights.h5")) as f:
                arrays = []
                f.visititems(lambda _, o, a=arrays: a.append(np.array(o))
                             if isinstance(o, h5py.Dataset) else None)
            weights.append(arrays)
        self.assertNotEmpty(weights[0])
        for first, second in zip(*weights):
            self.assertAllEqual(first, second)

    def test_lfm_w2_is_exported_when_asked(self):
        workdir = self.get_temp_dir()
        config = _smoke_config("lfm", evaluate_learner="w2", encoder="shared",
                               steps_per_epoch=2)
        train_lib.train_and_evaluate(config, workdir)
        self.assertTrue(os.path.exists(
            os.path.join(workdir, "saved_model", "saved_model.pb")))


class ReweightingWorksTest(tf.test.TestCase):
    """A measured property, not a smoke test: on digits with 40% uniform
    noise, the learned weights favour clean examples."""

    def _train(self, method, epochs, **overrides):
        config = _smoke_config(
            method, epochs=epochs, steps_per_epoch=None, batch_size=64,
            meta_batch_size=50, num_meta_per_class=10, width=16, seed=1,
            **overrides)
        data = train_lib.prepare_data(config)
        from lfm_tf.methods import factory  # pylint: disable=g-import-not-at-top
        model = factory.compile_method(
            factory.build_method(config, data["facts"]), config)
        history = model.fit(data["train"], epochs=config.train.epochs,
                            verbose=0, shuffle=False)
        return history.history

    def test_lfm_mistake_weights_lower_on_corrupted(self):
        history = self._train("lfm", epochs=4)
        clean = np.mean(history["a_clean"][-2:])
        corrupted = np.mean(history["a_corrupted"][-2:])
        self.assertGreater(clean, corrupted + 0.005)

    def test_mwnet_weights_lower_on_corrupted(self):
        # MW-Net first up-weights high-loss (hard) examples; once the clean
        # ones are fitted, the high loss of corrupted ones marks them.
        history = self._train("mwnet", epochs=8, w1_learning_rate=0.1,
                              weight_normalization="batch_mean")
        self.assertGreater(history["weight_clean"][-1],
                           history["weight_corrupted"][-1] + 0.05)


class RelatedMethodsSmokeTest(tf.test.TestCase, parameterized.TestCase):
    """configs/smoke/train_<method>.flags through `python -m pipelines.train`."""

    @parameterized.parameters("penalty", "lrw_easy", "lrw_random", "lrw_hard",
                              "molere")
    def test_smoke_flagfile_runs_end_to_end(self, method):
        workdir = self.get_temp_dir()
        result = subprocess.run(
            [sys.executable, "-m", "pipelines.train",
             f"--flagfile=configs/smoke/train_{method}.flags",
             "--steps_per_epoch=1", f"--workdir={workdir}"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            check=False)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        with open(os.path.join(workdir, "config.json")) as f:
            self.assertEqual(json.load(f)["method"]["method"], method)
        with open(os.path.join(workdir, "metrics.json")) as f:
            self.assertBetween(json.load(f)["test_accuracy"], 0.0, 1.0)
        self.assertTrue(os.path.exists(
            os.path.join(workdir, "saved_model", "saved_model.pb")))
        if method.startswith("lrw_"):
            self.assertTrue(os.path.exists(
                os.path.join(workdir, "lrw_split.npz")))


class CommandLineTest(tf.test.TestCase):

    def _run(self, *args):
        return subprocess.run(
            [sys.executable, "-m", "pipelines.train", *args], cwd=REPO,
            capture_output=True, text=True, timeout=600, check=False)

    def test_smoke_flagfile(self):
        workdir = self.get_temp_dir()
        result = self._run("--flagfile=configs/smoke/train_lfm.flags",
                           "--steps_per_epoch=2", f"--workdir={workdir}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn(f"Artefacts written to {workdir}", result.stdout)
        with open(os.path.join(workdir, "config.json")) as f:
            config = json.load(f)
        self.assertEqual(config["train"]["steps_per_epoch"], 2)
        self.assertEqual(config["data"]["noise_rate"], 0.4)

    def test_bad_value_is_a_clear_error_and_writes_nothing(self):
        workdir = os.path.join(self.get_temp_dir(), "never")
        result = self._run("--flagfile=configs/smoke/train_lfm.flags",
                           "--noise_rate=1.5", f"--workdir={workdir}")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("noise_rate=1.5", result.stderr)
        self.assertFalse(os.path.exists(workdir))

    def test_unknown_choice(self):
        result = self._run("--method=magic", "--workdir=/tmp/x")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("method='magic'", result.stderr)


if __name__ == "__main__":
    tf.test.main()
