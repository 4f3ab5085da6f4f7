"""pipelines.search end to end: search -> genotype.json -> train -> SavedModel,
P-DARTS' stages and resume, LFM-DARTS, bad input."""

import json
import os
import subprocess
import sys

import tensorflow as tf

from lfm_tf import search_lib
from lfm_tf.nas import genotypes
from pipelines import flags as flags_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _run(args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def _config(flagfile, **overrides):
    """The config a flagfile gives, parsed by the real flag definitions."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    values = flags.FlagValues()
    flags_lib.define_flags(values)
    values([sys.argv[0], f"--flagfile={flagfile}", "--workdir=unused"])
    config = flags_lib.config_from_flags(values=values)
    return config.replace(**overrides)


class SearchPipelineTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.cwd = os.getcwd()
        os.chdir(REPO)  # Flagfiles name each other relative to the repo.

    def tearDown(self):
        os.chdir(self.cwd)
        super().tearDown()

    def test_search_then_train_its_genotype_then_serve(self):
        workdir = os.path.join(self.get_temp_dir(), "search")
        searched = _run(["pipelines.search",
                         "--flagfile=configs/smoke/search_darts.flags",
                         f"--workdir={workdir}"])
        self.assertEqual(searched.returncode, 0, searched.stderr[-3000:])
        genotype = genotypes.load(os.path.join(workdir, "genotype.json"))
        self.assertLen(genotype.normal, 4)  # 2 nodes x 2 inputs
        with open(os.path.join(workdir, "search_summary.json")) as f:
            summary = json.load(f)
        self.assertGreater(summary["seconds_to_first_step"], 0)
        self.assertNotEmpty(os.listdir(os.path.join(workdir, "logs")))
        # The printed command trains the cell (shortened for the test).
        command = searched.stdout.strip().splitlines()[-1].split()
        self.assertEqual(command[:3], ["python", "-m", "pipelines.train"])
        trained = _run(command[2:] + ["--steps_per_epoch=1"])
        self.assertEqual(trained.returncode, 0, trained.stderr[-3000:])
        eval_dir = workdir + "_eval"
        with open(os.path.join(eval_dir, "export_info.json")) as f:
            info = json.load(f)
        self.assertEqual(
            genotypes.load(info["architecture"]["model"]["genotype"]),
            genotype)
        # A fresh process serves the SavedModel: only the derived network.
        served = subprocess.run([sys.executable, "-c", (
            "import tensorflow as tf, numpy as np;"
            f"m = tf.saved_model.load({os.path.join(eval_dir, 'saved_model')!r});"
            "out = m.signatures['serving_default']("
            "images=tf.zeros([3, 8, 8, 3], tf.uint8));"
            "print(out['probabilities'].shape)")],
            capture_output=True, text=True, timeout=300)
        self.assertEqual(served.returncode, 0, served.stderr[-2000:])
        self.assertIn("(3, 10)", served.stdout)

    def test_progressive_stages_drop_ops_and_resume(self):
        workdir = os.path.join(self.get_temp_dir(), "pdarts")
        config = _config("configs/smoke/search_pdarts.flags")
        genotype = search_lib.run_search(config, workdir)
        widths = []
        for index in range(2):
            with open(os.path.join(workdir, f"stage_{index}",
                                   "result.json")) as f:
                stage = json.load(f)
            widths.append({len(ops) for ops in stage["normal_ops"]})
            self.assertEqual(stage["cells"], 3 + index)
        self.assertEqual(widths, [{4}, {2}])
        self.assertLessEqual(genotype.skip_count("normal"), 2)
        self.assertEqual(genotypes.load(workdir), genotype)
        # Rerun after losing the last stage's result: stage 0 is skipped,
        # stage 1 resumes from its checkpoint, same genotype.
        os.remove(os.path.join(workdir, "stage_1", "result.json"))
        first = os.path.join(workdir, "stage_0", "result.json")
        written = os.stat(first).st_mtime_ns
        again = search_lib.run_search(config, workdir)
        self.assertEqual(again, genotype)
        self.assertEqual(os.stat(first).st_mtime_ns, written)
        self.assertTrue(os.path.exists(os.path.join(workdir, "stage_1",
                                                    "result.json")))

    def test_lfm_darts_with_parameter_sharing(self):
        workdir = os.path.join(self.get_temp_dir(), "lfm")
        config = _config("configs/smoke/search_lfm_darts.flags")
        genotype = search_lib.run_search(config, workdir)
        self.assertEqual(genotypes.load(workdir), genotype)

    def test_bad_methods_are_refused_with_the_fix(self):
        workdir = os.path.join(self.get_temp_dir(), "bad")
        searched = _run(["pipelines.search",
                         "--flagfile=configs/smoke/search_darts.flags",
                         "--method=erm", f"--workdir={workdir}"])
        self.assertNotEqual(searched.returncode, 0)
        self.assertIn("pipelines.train", searched.stderr)
        trained = _run(["pipelines.train",
                        "--flagfile=configs/smoke/search_darts.flags",
                        f"--workdir={workdir}"])
        self.assertNotEqual(trained.returncode, 0)
        self.assertIn("pipelines.search", trained.stderr)
        self.assertFalse(os.path.exists(os.path.join(workdir,
                                                     "genotype.json")))


if __name__ == "__main__":
    tf.test.main()
