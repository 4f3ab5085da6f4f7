"""pipelines.tune: real KerasTuner searches, resume, best flags, distributed."""

import glob
import json
import os
import socket
import subprocess
import sys

import tensorflow as tf
from absl import flags

from lfm_tf import config as config_lib
from lfm_tf import tuning
from pipelines import flags as flags_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TINY = ["--flagfile=configs/tune/digits_lfm.flags", "--epochs=2",
        "--steps_per_epoch=2"]


def _run(module, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
        text=True, timeout=900, check=False, env={**os.environ, **(env or {})})


def _trials(workdir):
    return sorted(glob.glob(os.path.join(workdir, "search", "trial_*",
                                         "trial.json")))


class SpaceTest(tf.test.TestCase):

    def test_parse_and_describe(self):
        space = tuning.parse_space([
            "w1_learning_rate=float:0.01:0.3:log",
            "num_meta_per_class=int:5:10",
            "similarity=choice:dot,cosine",
            "use_mistakes=choice:True,False",
        ])
        self.assertEqual([d.kind for d in space],
                         ["float", "int", "choice", "choice"])
        self.assertTrue(space[0].log)
        self.assertEqual(space[2].values, ("dot", "cosine"))
        self.assertIn("one of ['dot', 'cosine']", space[2].describe())

    def test_bad_entries(self):
        noisy = config_lib.ExperimentConfig().replace(noise_type="uniform")
        for entry, message in [
            ("nosuch=float:0:1", "names no config field 'nosuch'"),
            ("w1_learning_rate=float:1:0.1", "Cannot parse"),
            ("w1_learning_rate=float:0:1:log", "Cannot parse"),
            ("w1_learning_rate=gauss:0:1", "Cannot parse"),
            ("similarity=choice:dot,manhattan", "similarity='manhattan'"),
            ("noise_rate=float:0.1:1.5", "noise_rate=1.5"),
        ]:
            with self.assertRaisesRegex(ValueError, message):
                tuning.parse_space([entry], noisy)

    def test_defaults_parse_for_every_method(self):
        for method in config_lib.METHODS:
            base = config_lib.ExperimentConfig().replace(method=method)
            if method in config_lib.SEARCH_METHODS:
                with self.assertRaisesRegex(ValueError, "--genotype"):
                    tuning.merge_space(base, [])
            else:
                self.assertNotEmpty(tuning.merge_space(base, []))

    def test_flagfile_round_trip(self):
        config = config_lib.ExperimentConfig().replace(
            noise_type="flip", noise_rate=0.2, flip=False, image_size=16,
            method="mwnet")
        path = os.path.join(self.get_temp_dir(), "best.flags")
        with open(path, "w") as f:
            f.write(tuning.to_flagfile(config, "header"))
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        values(["prog", f"--flagfile={path}"])
        self.assertEqual(flags_lib.config_from_flags(values=values), config)


class TuneCommandTest(tf.test.TestCase):

    def test_search_best_flags_train_and_resume(self):
        workdir = self.get_temp_dir()
        result = _run("pipelines.tune", *TINY, "--max_trials=2",
                      f"--workdir={workdir}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertLen(_trials(workdir), 2)
        with open(os.path.join(workdir, "results", "results.md")) as f:
            table = f.read()
        self.assertEqual(table.count("\n| "), 2)  # header excluded
        best = os.path.join(workdir, "results", "best.flags")
        self.assertTrue(os.path.exists(best))
        before = {p: open(p).read() for p in _trials(workdir)}

        # Rerunning continues: one more trial, finished ones untouched.
        result = _run("pipelines.tune", *TINY, "--max_trials=3",
                      f"--workdir={workdir}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertLen(_trials(workdir), 3)
        for path, text in before.items():
            with open(path) as f:
                self.assertEqual(json.load(f), json.loads(text))

        # The best flags train as they are.
        run_dir = os.path.join(workdir, "retrain")
        result = _run("pipelines.train", f"--flagfile={best}",
                      f"--workdir={run_dir}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertTrue(os.path.exists(os.path.join(run_dir, "metrics.json")))

    def test_invalid_space_is_a_clear_error(self):
        result = _run("pipelines.tune", *TINY,
                      "--tune_space=w1_learning_rate=float:1:0",
                      f"--workdir={self.get_temp_dir()}")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("Cannot parse search-space entry", result.stderr)

    def test_print_space(self):
        result = _run("pipelines.tune", *TINY, "--print_space",
                      "--workdir=/tmp/unused")
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("hypergradient: one of ['exact', 'first_order']",
                      result.stdout)

    def test_chief_and_worker_on_localhost(self):
        workdir = self.get_temp_dir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        common = {"KERASTUNER_ORACLE_IP": "127.0.0.1",
                  "KERASTUNER_ORACLE_PORT": port}
        args = [sys.executable, "-m", "pipelines.tune", *TINY,
                "--max_trials=2", f"--workdir={workdir}"]
        chief = subprocess.Popen(
            args, cwd=REPO, env={**os.environ, **common,
                                 "KERASTUNER_TUNER_ID": "chief"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        worker = subprocess.Popen(
            args, cwd=REPO, env={**os.environ, **common,
                                 "KERASTUNER_TUNER_ID": "tuner0"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, worker_err = worker.communicate(timeout=900)
        _, chief_err = chief.communicate(timeout=900)
        self.assertEqual(worker.returncode, 0, worker_err[-3000:])
        self.assertEqual(chief.returncode, 0, chief_err[-3000:])
        self.assertLen(_trials(workdir), 2)
        self.assertTrue(os.path.exists(
            os.path.join(workdir, "results", "best.flags")))


if __name__ == "__main__":
    tf.test.main()
