"""pipelines.nas_benchmark: the smoke protocol end to end and its rerun;
parsing, resume and the report with stand-in searches and runs."""

import csv
import json
import os
import subprocess
import sys
import tempfile
import unittest

from absl import flags

from lfm_tf import config as config_lib
from lfm_tf import nas_protocol
from lfm_tf.nas import genotypes
from pipelines import flags as flags_lib
from pipelines import nas_benchmark

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SMOKE = "configs/benchmark/nas_smoke.flags"
NAMES = ["darts", "lfm_darts", "random_0", "random_1"]


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.nas_benchmark", *args], cwd=REPO,
        capture_output=True, text=True, timeout=1800, check=False)


def _parse(path, *extra):
    """(base, protocol) of a flagfile, parsed by the real flags."""
    values = flags.FlagValues()
    flags_lib.define_flags(values)
    nas_benchmark.define_nas_flags(values)
    cwd = os.getcwd()
    os.chdir(REPO)  # Flagfiles name each other relative to the repo.
    try:
        values(["prog", f"--flagfile={path}", "--workdir=w", *extra])
    finally:
        os.chdir(cwd)
    return nas_benchmark.protocol_from_flags(values)


def _mtimes(paths):
    return {p: os.stat(p).st_mtime_ns for p in paths}


class SmokeProtocolTest(unittest.TestCase):
    """configs/benchmark/nas_smoke.flags: 2 searches, 2 random cells."""

    def test_writes_every_output_and_a_rerun_skips_finished_work(self):
        with tempfile.TemporaryDirectory() as workdir:
            first = _run(f"--flagfile={SMOKE}", f"--workdir={workdir}")
            self.assertEqual(first.returncode, 0, first.stderr[-3000:])
            self.assertIn("Searches: 2 run, 0 skipped", first.stdout)
            self.assertIn("Runs: 4 trained, 0 skipped", first.stdout)
            genotype_files = [
                os.path.join(workdir, "search", "darts", "genotype.json"),
                os.path.join(workdir, "search", "lfm_darts", "genotype.json"),
                os.path.join(workdir, "genotypes", "random_0.json"),
                os.path.join(workdir, "genotypes", "random_1.json")]
            for path in genotype_files:
                genotype = genotypes.load(path)
                self.assertEqual(genotype.steps, 2)  # The searched space.
                self.assertTrue({op for op, _ in genotype.normal}
                                <= {"max_pool_3x3", "skip_connect"})
            runs = [os.path.join(workdir, "runs", "train", name, "seed_0")
                    for name in NAMES]
            for run, path in zip(runs, genotype_files):
                with open(os.path.join(run, "config.json")) as f:
                    config = json.load(f)
                self.assertEqual(config["method"]["method"], "erm")
                self.assertEqual(config["model"]["genotype"], path)
                self.assertEqual(config["model"]["cells"], 3)

            with open(os.path.join(workdir, "results.csv")) as f:
                rows = list(csv.DictReader(f))
            self.assertEqual([(r["method"], r["status"]) for r in rows],
                             [(name, "done") for name in NAMES])
            for row in rows:
                self.assertGreater(int(row["parameters"]), 0)
                self.assertTrue(0 <= float(row["test_accuracy"]) <= 1)
                self.assertTrue(0 <= float(row["best_val_accuracy"]) <= 1)
            self.assertTrue(rows[0]["genotype_origin"].startswith("search"))
            self.assertEqual(rows[2]["genotype_origin"], "random (seed 0)")
            self.assertGreater(float(rows[1]["search_wall_time_s"]), 0)
            with open(os.path.join(workdir, "results.md")) as f:
                markdown = f.read()
            for name in NAMES:
                self.assertIn(f"| {name} |", markdown)
            self.assertIn("Random baseline:", markdown)
            self.assertIn("Runs: 4 done, 0 failed", markdown)
            self.assertTrue(os.path.exists(
                os.path.join(workdir, "plots", "accuracy.png")))

            outputs = genotype_files + [os.path.join(r, "metrics.json")
                                        for r in runs]
            before = _mtimes(outputs)
            second = _run(f"--flagfile={SMOKE}", f"--workdir={workdir}")
            self.assertEqual(second.returncode, 0, second.stderr[-3000:])
            self.assertIn("Searches: 0 run, 2 skipped", second.stdout)
            self.assertIn("Runs: 0 trained, 4 skipped", second.stdout)
            self.assertEqual(_mtimes(outputs), before)


def _stand_ins(calls):
    """A search that writes a fixed cell and a run that writes metrics."""

    def search(config, workdir):
        calls.append(("search", config.method.method, config.train.epochs))
        os.makedirs(workdir, exist_ok=True)
        genotype = genotypes.random_genotype(
            99, steps=config.search.search_steps,
            primitives=config.search.primitives)
        genotype.save(os.path.join(workdir, "genotype.json"))
        with open(os.path.join(workdir, "search_summary.json"), "w") as f:
            json.dump({"wall_seconds": 12.0}, f)
        return genotype

    def train(config, workdir):
        calls.append(("train", config.model.genotype, config.train.epochs))
        os.makedirs(workdir, exist_ok=True)
        searched = os.sep + "search" + os.sep in config.model.genotype
        accuracy = 0.9 if searched else 0.5
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump({"test_accuracy": accuracy + 0.01 * config.data.seed,
                       "best_val_accuracy": 0.6}, f)
        with open(os.path.join(workdir, "export_info.json"), "w") as f:
            json.dump({"class_names": list("0123456789"),
                       "input_shape": [8, 8, 3]}, f)
        return {}

    return search, train


class ProtocolTest(unittest.TestCase):

    def setUp(self):
        self.base = config_lib.ExperimentConfig().replace(
            search_steps=2, search_primitives="none,skip_connect,max_pool_3x3")

    def _protocol(self, workdir, **changes):
        args = dict(methods=["darts", "lfm_darts"], search_budget="epochs=3",
                    train_budget="epochs=5;width=4;cells=3",
                    num_random=2, seeds=["0", "1"])
        args.update(changes)
        return nas_protocol.parse_protocol(base=self.base, workdir=workdir,
                                           **args)

    def test_same_budgets_and_genotypes_as_grid_methods(self):
        protocol = self._protocol("w")
        for entry in protocol.searches:
            config = protocol.search_config(self.base, entry)
            self.assertEqual(config.train.epochs, 3)
            self.assertEqual(config.method.method, entry.name)
        grid = protocol.grid("w")
        self.assertEqual([m.name for m in grid.methods], NAMES)
        self.assertEqual(len(grid.cells()), 8)
        config = grid.config_for(self.base, grid.cells()[2])
        self.assertEqual(config.method.method, "erm")
        self.assertEqual(config.model.genotype,
                         os.path.join("w", "genotypes", "random_0.json"))
        self.assertEqual((config.train.epochs, config.model.cells), (5, 3))

    def test_bad_input_names_the_flag_and_the_fix(self):
        cases = [
            (dict(methods=["erm"]), "expected a search method"),
            (dict(methods=[]), "empty --nas_methods"),
            (dict(methods=["random_0:method=darts"]), "more than once"),
            (dict(train_budget="nosuch=1"), "--nas_train"),
            (dict(search_budget="epochs=0"), "Search 'darts"),
            (dict(num_random=-1), "--nas_random_genotypes=-1"),
            (dict(seeds=["x"]), "--nas_seeds"),
        ]
        for changes, message in cases:
            with self.subTest(changes=changes):
                with self.assertRaises(ValueError) as caught:
                    self._protocol("w", **changes)
                self.assertIn(message, str(caught.exception))

    def test_rerun_skips_searches_draws_and_runs(self):
        calls = []
        search, train = _stand_ins(calls)
        with tempfile.TemporaryDirectory() as workdir:
            protocol = self._protocol(workdir)
            done = nas_protocol.run_protocol(protocol, self.base, workdir,
                                             search, train)
            self.assertEqual(done["searches"],
                             {"darts": "done", "lfm_darts": "done"})
            self.assertEqual([c[0] for c in calls].count("train"), 8)
            self.assertIn(("search", "lfm_darts", 3), calls)
            self.assertIn(("train", os.path.join(
                workdir, "search", "darts", "genotype.json"), 5), calls)
            random_0 = os.path.join(workdir, "genotypes", "random_0.json")
            self.assertEqual(genotypes.load(random_0),
                             genotypes.random_genotype(
                                 0, steps=2,
                                 primitives=self.base.search.primitives))
            with open(os.path.join(workdir, "parameters.json")) as f:
                counts = json.load(f)
            self.assertEqual(sorted(counts), sorted(NAMES))
            self.assertTrue(all(c > 0 for c in counts.values()))

            calls.clear()
            again = nas_protocol.run_protocol(protocol, self.base, workdir,
                                              search, train)
            self.assertEqual(calls, [])
            self.assertEqual(set(again["searches"].values()), {"skipped"})
            self.assertEqual({r.status for r in again["runs"]}, {"skipped"})

            report = nas_protocol.write_report(protocol, workdir, "T")
            with open(report["markdown"]) as f:
                markdown = f.read()
            # darts and lfm_darts tie at 90.50 ± 0.71: both bold.
            self.assertIn("| darts | search: darts:method=darts | ", markdown)
            self.assertEqual(markdown.count("**90.50 ± 0.71** (2)"), 2)
            self.assertIn("| 50.50 ± 0.71 (2) | 60.00 ± 0.00 | – |",
                          markdown)
            self.assertIn("Random baseline: 50.50 ± 0.00 test accuracy, "
                          "mean ± std over 2 random genotypes.", markdown)
            with open(report["csv"]) as f:
                rows = list(csv.DictReader(f))
            self.assertEqual(rows[0]["search_wall_time_s"], "12.0")
            self.assertEqual(rows[0]["parameters"], str(counts["darts"]))


class ShippedFlagfilesTest(unittest.TestCase):

    def test_nas_flagfiles_parse_into_valid_protocols(self):
        for path in ("configs/benchmark/cpu_nas.flags", SMOKE):
            with self.subTest(path=path):
                base, protocol = _parse(path)
                self.assertEqual([e.name for e in protocol.searches],
                                 ["darts", "lfm_darts"])
                self.assertEqual(base.search.search_steps, 2)
        base, protocol = _parse("configs/benchmark/cpu_nas.flags")
        self.assertEqual(base.data.source, "folder")
        self.assertEqual(protocol.num_random, 3)
        search = protocol.search_config(base, protocol.searches[1])
        self.assertEqual((search.train.epochs, search.train.steps_per_epoch,
                          search.method.encoder), (2, 60, "small_cnn"))


if __name__ == "__main__":
    unittest.main()
