"""pipelines.tune: real KerasTuner searches, resume, best flags, distributed."""

import glob
import json
import os
import socket
import subprocess
import sys

import tensorflow as tf
from absl import flags
from absl.testing import parameterized

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


# (entry, what the error must say); each is refused before any trial.
BAD_ENTRIES = [
    ("nosuch=float:0:1", "names no config field 'nosuch'"),
    ("w1_learning_rate=float:1:0.1", "Cannot parse"),
    ("w1_learning_rate=float:0:1:log", "Cannot parse"),
    ("w1_learning_rate=gauss:0:1", "Cannot parse"),
    ("similarity=choice:dot,manhattan", "similarity='manhattan'"),
    ("noise_rate=float:0.1:1.5", "noise_rate=1.5"),
    # bool("false") is True: only true/false/1/0 are bools.
    ("use_mistakes=choice:yes,no", "use_mistakes='yes'.*true, false"),
    ("use_mistakes=choice:true,1", "repeats a value"),
    ("num_meta_per_class=int:5.5:10", "fractional.*int:5:10"),
    ("num_meta_per_class=int:5:9.5", "fractional"),
    ("batch_size=float:32:64", "int field.*batch_size=int:LOW:HIGH"),
    ("w1_learning_rate=int:1:3", "float field"),
    ("use_mistakes=int:0:1", "bool field.*choice"),
    ("num_meta_per_class=choice:5,7.5", "num_meta_per_class='7.5'"),
    ("encoder=choice:", "encoder='' is not allowed; expected a non-empty"),
    # An architecture search inside a choice crashed trial 1.
    ("method=choice:erm,darts", "method='darts'.*training method"),
    ("method=choice:erm,nosuch", "method='nosuch' is not allowed"),
    ("seed=choice:0,-1", "seed=-1"),
]


class SpaceTest(tf.test.TestCase, parameterized.TestCase):

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

    @parameterized.parameters(*BAD_ENTRIES)
    def test_bad_entry(self, entry, message):
        noisy = config_lib.ExperimentConfig().replace(noise_type="uniform")
        with self.assertRaisesRegex(ValueError, message):
            tuning.parse_space([entry], noisy)


    def test_bool_and_int_values_keep_their_meaning(self):
        space = tuning.parse_space([
            "use_mistakes=choice:false,True",
            "use_label_mask=choice:0,1",
            "num_meta_per_class=int:5:10",
        ])
        for dimension in space[:2]:
            self.assertEqual(dimension.values, (False, True))
            self.assertEqual([type(v) for v in dimension.values], [bool] * 2)
        self.assertEqual((space[2].low, space[2].high), (5, 10))
        self.assertIn("int in [5, 10]", space[2].describe())

    def test_combinations_are_checked_before_the_first_trial(self):
        # Each entry is valid alone; DBL needs batches its splits divide.
        base = config_lib.ExperimentConfig().replace(method="erm")
        with self.assertRaisesRegex(
                ValueError, "method='dbl' with batch_size=62 gives: "
                "Received batch_size=62 with dbl_splits=4"):
            tuning.merge_space(base, ["method=choice:erm,dbl",
                                      "batch_size=int:62:64"])
        # The failing combination is reduced to the entries that cause it.
        noisy = base.replace(noise_type="uniform")
        with self.assertRaisesRegex(
                ValueError, r"of \['noise_rate', 'noise_type'\]"):
            tuning.merge_space(noisy, ["noise_type=choice:uniform,none",
                                      "noise_rate=float:0.1:0.3",
                                      "similarity=choice:dot,l2"])
        self.assertLen(tuning.merge_space(
            base, ["method=choice:erm,dbl", "batch_size=int:64:68"]), 4)

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
        # Refused before the first trial: a message, no traceback, no trial.
        workdir = self.get_temp_dir()
        result = _run("pipelines.tune", *TINY,
                      "--tune_space=method=choice:lfm,darts",
                      f"--workdir={workdir}")
        self.assertEqual(result.returncode, 1, result.stderr[-3000:])
        self.assertIn("error: Search-space entry 'method=choice:lfm,darts': "
                      "method='darts' is not allowed", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEmpty(_trials(workdir))

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
