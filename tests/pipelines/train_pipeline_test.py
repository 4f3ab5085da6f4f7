"""pipelines.train end to end on the embedded digits data, every method."""

import glob
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf import config as config_lib
from lfm_tf import train_lib
from lfm_tf import workdir as workdir_lib
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


class WorkdirSafetyTest(tf.test.TestCase):
    """One run per workdir: config guard, --overwrite, lock, leftovers."""

    def test_finished_workdir_refuses_another_config_unless_overwrite(self):
        workdir = self.get_temp_dir()
        previous = _smoke_config("mwnet", steps_per_epoch=1)
        train_lib.train_and_evaluate(previous, workdir)
        # As an LFM run leaves its B; MW-Net (a meta-net, no table) and ERM
        # write none, so only --overwrite can remove this one.
        stale = os.path.join(workdir, "example_weights.npz")
        np.savez(stale, weights=np.ones(3))
        erm = _smoke_config("erm", steps_per_epoch=1, noise_rate=0.2)
        # A finished run has no backup/ to resume, yet it is guarded.
        shutil.rmtree(os.path.join(workdir, "backup"))
        with self.assertRaisesRegex(
                workdir_lib.ConfigMismatchError,
                r"in 2 field\(s\): data.noise_rate: 0.4 -> 0.2; "
                r"method.method: 'mwnet' -> 'erm'.*--overwrite"):
            train_lib.train_and_evaluate(erm, workdir)
        with open(os.path.join(workdir, "config.json")) as f:
            self.assertEqual(json.load(f)["method"]["method"], "mwnet")
        train_lib.train_and_evaluate(erm.replace(overwrite=True), workdir)
        with open(os.path.join(workdir, "config.json")) as f:
            self.assertEqual(json.load(f)["method"]["method"], "erm")
        self.assertFalse(os.path.exists(stale))
        # --overwrite is how a run is executed, not what it computes.
        self.assertEqual(workdir_lib.config_differences(
            json.loads(erm.to_json()),
            json.loads(erm.replace(overwrite=True).to_json())), [])

    def test_second_process_is_refused_with_the_holders_pid(self):
        workdir = self.get_temp_dir()
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, time; from lfm_tf import workdir as w\n"
             f"with w.lock({workdir!r}):\n"
             "    print('locked', flush=True); time.sleep(60)"],
            cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(holder.stdout.readline().strip(), "locked")
            with self.assertRaisesRegex(
                    workdir_lib.WorkdirInUseError,
                    rf"--workdir={workdir}, which another run \(PID "
                    rf"{holder.pid}\) is using"):
                train_lib.train_and_evaluate(_smoke_config("erm"), workdir)
            self.assertFalse(os.path.exists(
                os.path.join(workdir, "config.json")))
        finally:
            holder.kill()
            holder.wait()
        # The kernel dropped the dead holder's lock.
        with workdir_lib.lock(workdir):
            with self.assertRaisesRegex(workdir_lib.WorkdirInUseError,
                                        rf"PID {os.getpid()}\)"):
                with workdir_lib.lock(workdir):
                    pass

    def test_search_workdir_is_guarded_too(self):
        from lfm_tf import search_lib  # pylint: disable=g-import-not-at-top
        workdir = self.get_temp_dir()
        previous = _smoke_config("darts", noise_rate=0.0)
        workdir_lib.write_config(workdir, previous)
        with self.assertRaisesRegex(workdir_lib.ConfigMismatchError,
                                    "data.noise_rate: 0.0 -> 0.4"):
            search_lib.run_search(_smoke_config("darts"), workdir)
        with workdir_lib.lock(workdir):
            with self.assertRaisesRegex(workdir_lib.WorkdirInUseError,
                                        "another run"):
                search_lib.run_search(previous, workdir)

    def test_leftovers_of_a_killed_run_are_removed(self):
        workdir = self.get_temp_dir()
        partial = os.path.join(workdir, ".saved_model.partial-x1y2")
        os.makedirs(os.path.join(partial, "variables"))
        for name in (".tmp-abc", os.path.join("checkpoints", ".tmp-def"),
                     "test_predictions.npz.tmp.npz"):
            os.makedirs(os.path.dirname(os.path.join(workdir, name)),
                        exist_ok=True)
            with open(os.path.join(workdir, name), "w") as f:
                f.write("half")
        train_lib.train_and_evaluate(
            _smoke_config("erm", steps_per_epoch=1), workdir)
        self.assertEqual(
            sorted(n for n in os.listdir(workdir) if n.startswith(".")),
            [".lock"])
        self.assertEqual(os.listdir(os.path.join(workdir, "checkpoints")),
                         ["best.weights.h5"])
        self.assertFalse(glob.glob(os.path.join(workdir, "*.tmp.npz")))

    def test_invalid_data_writes_no_config(self):
        workdir = self.get_temp_dir()
        with self.assertRaisesRegex(ValueError, "num_meta_per_class=500"):
            train_lib.train_and_evaluate(
                _smoke_config("erm", num_meta_per_class=500), workdir)
        self.assertFalse(os.path.exists(os.path.join(workdir,
                                                     "config.json")))
        # So the corrected command is not refused as "another config".
        train_lib.train_and_evaluate(
            _smoke_config("erm", steps_per_epoch=1), workdir)

    def test_diverged_run_exits_non_zero_and_exports_nothing(self):
        workdir = os.path.join(self.get_temp_dir(), "nan")
        result = subprocess.run(
            [sys.executable, "-m", "pipelines.train",
             "--flagfile=configs/smoke/train_erm.flags",
             "--w1_learning_rate=1e9", "--steps_per_epoch=2",
             f"--workdir={workdir}"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            check=False)
        self.assertNotEqual(result.returncode, 0)
        # Step 2's training loss was computed before its update broke W;
        # the validation pass after it overflows.
        self.assertRegex(
            result.stderr, r"Received a non-finite epoch loss \(val_loss=nan"
            r"\) at epoch 1, step 2 of 2 \(global step 2\).*"
            r"--w1_learning_rate=1000000000.0.*--grad_clip_norm")
        for name in ("saved_model", "metrics.json", "classifier.weights.h5"):
            self.assertFalse(os.path.exists(os.path.join(workdir, name)),
                             name)


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
        # Choice fields are absl enums: refused at parse time, naming the
        # flag, the value and the allowed ones.
        result = self._run("--method=magic", "--workdir=/tmp/x")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--method=magic", result.stderr)
        self.assertIn("erm|focal|class_balanced", result.stderr)


if __name__ == "__main__":
    tf.test.main()
