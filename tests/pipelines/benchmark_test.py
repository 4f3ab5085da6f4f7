"""pipelines.benchmark: a tiny grid end to end, resume, report, bad input."""

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from unittest import mock

import numpy as np

from lfm_tf import benchmark_grid
from lfm_tf import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.benchmark", *args], cwd=REPO,
        capture_output=True, text=True, timeout=600, check=False)


class SmokeGridTest(unittest.TestCase):
    """configs/benchmark/smoke.flags: 2 methods x 1 setting x 1 seed."""

    def test_writes_every_output_and_resume_skips_finished_cells(self):
        with tempfile.TemporaryDirectory() as workdir:
            first = _run("--flagfile=configs/benchmark/smoke.flags",
                         "--steps_per_epoch=1", f"--workdir={workdir}")
            self.assertEqual(first.returncode, 0, first.stderr[-3000:])
            self.assertIn("Cells: 2 trained, 0 skipped", first.stdout)
            cells = [os.path.join(workdir, "runs", "uniform40", m, "seed_0")
                     for m in ("erm", "lfm")]
            for cell in cells:
                for name in ("metrics.json", "cell.json", "splits.npz",
                             "test_predictions.npz",
                             "saved_model/saved_model.pb"):
                    self.assertTrue(
                        os.path.exists(os.path.join(cell, name)),
                        f"{cell}/{name}")
            with open(os.path.join(cells[0], "metrics.json")) as f:
                metrics = json.load(f)
            self.assertEqual(sum(metrics["train_class_counts"]),
                             metrics["num_train"])
            # One time per epoch, and the cost the report reads is their sum.
            self.assertEqual(len(metrics["epoch_seconds"]),
                             len(metrics["val_accuracy_per_epoch"]))
            self.assertTrue(all(t > 0 for t in metrics["epoch_seconds"]))
            self.assertAlmostEqual(metrics["train_seconds"],
                                   sum(metrics["epoch_seconds"]), places=6)
            with open(os.path.join(cells[0], "cell.json")) as f:
                self.assertIn("threads", json.load(f))
            # Only LFM learns a weight per training example.
            self.assertTrue(os.path.exists(
                os.path.join(cells[1], "example_weights.npz")))
            self.assertFalse(os.path.exists(
                os.path.join(cells[0], "example_weights.npz")))
            with np.load(os.path.join(cells[1], "example_weights.npz")) as b:
                self.assertEqual(b["weights"].shape, b["is_corrupted"].shape)
            with np.load(os.path.join(cells[0],
                                      "test_predictions.npz")) as saved:
                with open(os.path.join(cells[0], "metrics.json")) as f:
                    accuracy = json.load(f)["test_accuracy"]
                self.assertAlmostEqual(
                    float(np.mean(saved["labels"] == saved["predictions"])),
                    accuracy)

            with open(os.path.join(workdir, "results.csv")) as f:
                rows = list(csv.DictReader(f))
            self.assertEqual([(r["method"], r["setting"], r["status"])
                              for r in rows],
                             [("erm", "uniform40", "done"),
                              ("lfm", "uniform40", "done")])
            self.assertFalse([k for k in rows[0] if k.startswith("_")])
            for row in rows:
                self.assertGreater(float(row["wall_time_s"]), 0)
                self.assertGreater(float(row["train_seconds"]), 0)
                self.assertTrue(0 <= float(row["test_accuracy"]) <= 1)
            with open(os.path.join(workdir, "results.md")) as f:
                markdown = f.read()
            self.assertIn("| method | uniform40 |", markdown)
            self.assertIn("**", markdown)
            self.assertIn("Machine: ", markdown)
            plots = sorted(os.listdir(os.path.join(workdir, "plots")))
            self.assertEqual(plots, [
                "accuracy.png", "alignment.png", "confusion_uniform40.png",
                "example_weights_uniform40.png", "per_class_accuracy.png"])
            import matplotlib  # pylint: disable=g-import-not-at-top
            matplotlib.use("Agg")
            import matplotlib.image  # pylint: disable=g-import-not-at-top
            for name in plots:
                path = os.path.join(workdir, "plots", name)
                with open(path, "rb") as f:
                    self.assertEqual(f.read(8), PNG_SIGNATURE, name)
                image = matplotlib.image.imread(path)
                self.assertEqual(image.ndim, 3, name)
                self.assertGreater(min(image.shape[:2]), 100, name)

            stamps = {c: os.stat(os.path.join(c, "metrics.json")).st_mtime_ns
                      for c in cells}
            second = _run("--flagfile=configs/benchmark/smoke.flags",
                          "--steps_per_epoch=1", f"--workdir={workdir}")
            self.assertEqual(second.returncode, 0, second.stderr[-3000:])
            self.assertIn("Cells: 0 trained, 2 skipped", second.stdout)
            for cell, stamp in stamps.items():
                self.assertEqual(
                    os.stat(os.path.join(cell, "metrics.json")).st_mtime_ns,
                    stamp, f"{cell} was retrained")


def _rows(accuracies, setting="s"):
    """Report rows of finished runs: {method: [test accuracy per seed]}."""
    return [dict(setting=setting, method=method, seed=seed, status="done",
                 test_accuracy=value, wall_time_s=1.0, workdir="x")
            for method, values in accuracies.items()
            for seed, value in enumerate(values)]


class ReportTest(unittest.TestCase):

    def setUp(self):
        self.grid = benchmark_grid.parse_grid(
            ["erm", "mwnet", "lfm"], ["s:noise_type=uniform;noise_rate=0.4"],
            ["0", "1"])

    def test_markdown_bolds_only_the_best_mean_with_std(self):
        rows = _rows({"erm": [0.70, 0.72], "mwnet": [0.80, 0.84],
                      "lfm": [0.78, 0.79]})
        markdown = benchmark_grid.results_markdown(self.grid, rows, "box")
        self.assertIn("| mwnet | **82.00 ± 2.83** (2) |", markdown)
        self.assertIn("| erm | 71.00 ± 1.41 (2) |", markdown)
        self.assertIn("| lfm | 78.50 ± 0.71 (2) |", markdown)
        self.assertEqual(markdown.count("**"), 2 + 2)  # Legend + one cell.
        self.assertIn("Machine: box.", markdown)

    def test_machine_line_names_the_runs_machines(self):
        rows = _rows({"erm": [0.70, 0.72], "lfm": [0.78]})
        rows[0]["machine"] = rows[2]["machine"] = "gpu box"
        rows[1]["machine"] = "cpu box"
        rows.append(dict(setting="s", method="mwnet", seed=0,
                         status="pending", machine="elsewhere"))
        self.assertEqual(benchmark_grid.runs_machines(rows),
                         "gpu box; cpu box")
        # No finished cell recorded one: the machine writing the report.
        self.assertEqual(benchmark_grid.runs_machines(rows[3:]),
                         benchmark_grid.machine_description())

    def test_remaining_time_is_estimated_from_finished_seeds_only(self):
        rows = _rows({"erm": [0.70], "lfm": [0.78]})
        rows[0]["train_seconds"] = 1800.0
        rows[1]["train_seconds"] = 7200.0
        rows += [dict(setting="s", method=method, seed=1, status=status,
                      test_accuracy=None, wall_time_s=None, workdir="x")
                 for method, status in (("erm", "pending"),
                                        ("lfm", "failed"),
                                        ("mwnet", "pending"))]
        # erm (0.5 h) and lfm (2 h) are estimated; mwnet has no finished
        # seed.
        self.assertEqual(benchmark_grid.remaining_lines(rows), [
            "", "Left: 3 cells. 2 of them have a finished seed of their "
            "method in their setting: about 2.5 h of one worker at the "
            "speed those ran at; no estimate yet for the other 1."])
        finished = [r for r in rows if r["status"] == "done"]
        self.assertEqual(benchmark_grid.remaining_lines(finished), [])

    def test_time_table_prefers_summed_epochs_and_marks_last_invocations(self):
        rows = _rows({"erm": [0.70, 0.72], "mwnet": [0.80, 0.84],
                      "lfm": [0.78, 0.79]})
        for row in rows:
            # A restarted run: its epochs took far longer than the last
            # invocation's wall time.
            row["train_seconds"] = 30.0 if row["method"] != "lfm" else None
        markdown = benchmark_grid.results_markdown(self.grid, rows, "box")
        self.assertIn("| erm | 30 |", markdown)
        self.assertIn("| lfm | 1* |", markdown)
        self.assertIn("* marks a mean", markdown)
        for row in rows:
            row["train_seconds"] = 30.0
        markdown = benchmark_grid.results_markdown(self.grid, rows, "box")
        self.assertIn("| lfm | 30 |", markdown)
        self.assertNotIn("* marks", markdown)

    def test_failed_cell_is_recorded_and_the_grid_goes_on(self):
        calls = []

        def train(config, workdir):
            calls.append(config.method.method)
            if config.method.method == "mwnet":
                raise RuntimeError("diverged")
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, "metrics.json"), "w") as f:
                json.dump({"test_accuracy": 0.5}, f)

        with tempfile.TemporaryDirectory() as workdir:
            base = config_lib.ExperimentConfig()
            results = benchmark_grid.run_grid(self.grid, base, workdir, train)
            self.assertEqual([r.status for r in results],
                             ["done", "failed", "done"] * 2)
            self.assertIn("RuntimeError: diverged", results[1].error)
            again = benchmark_grid.run_grid(self.grid, base, workdir, train)
            # Finished cells are skipped; the failed ones are tried again.
            self.assertEqual([r.status for r in again],
                             ["skipped", "failed", "skipped"] * 2)
            self.assertEqual(calls.count("erm"), 2)
            self.assertEqual(calls.count("mwnet"), 4)
            rows = benchmark_grid.collect_rows(self.grid, workdir)
            markdown = benchmark_grid.results_markdown(self.grid, rows, "box")
            self.assertIn("4 done, 2 failed, 0 pending", markdown)
            self.assertIn("RuntimeError: diverged", markdown)


class ArchiveTest(unittest.TestCase):
    """--grid_archive: finished cells outlive their workdir."""

    def setUp(self):
        self.grid = benchmark_grid.parse_grid(
            ["erm", "mwnet"], ["lt:imbalance_factor=4"], ["0"])
        self.calls = []

    def _train(self, config, workdir):
        """Writes what train_lib writes for a report; mwnet fails."""
        self.calls.append(config.method.method)
        if config.method.method == "mwnet":
            raise RuntimeError("diverged")
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json())
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump({"test_accuracy": 0.5,
                       "test_accuracy_per_class": [0.9, 0.8, 0.2, 0.1],
                       "train_class_counts": [40, 30, 10, 5]}, f)

    def test_a_fresh_workdir_restores_finished_cells_only(self):
        base = config_lib.ExperimentConfig()
        with tempfile.TemporaryDirectory() as root:
            archive = os.path.join(root, "archive")
            first = benchmark_grid.run_grid(
                self.grid, base, os.path.join(root, "a"), self._train,
                archive=archive)
            self.assertEqual([r.status for r in first], ["done", "failed"])
            erm = os.path.join(archive, "runs", "lt", "erm", "seed_0")
            self.assertEqual(sorted(os.listdir(erm)),
                             ["cell.json", "config.json", "metrics.json"])
            self.assertFalse(os.path.exists(
                os.path.join(archive, "runs", "lt", "mwnet")))

            fresh = os.path.join(root, "b")
            again = benchmark_grid.run_grid(self.grid, base, fresh,
                                            self._train, archive=archive)
            self.assertEqual([r.status for r in again],
                             ["skipped", "failed"])
            self.assertEqual(self.calls, ["erm", "mwnet", "mwnet"])
            # The report of the restored cell has its head / tail split
            # from metrics.json, without the run's splits.npz.
            row = benchmark_grid.collect_rows(self.grid, fresh)[0]
            self.assertEqual((row["status"], row["wall_time_s"] is None),
                             ("done", False))
            self.assertAlmostEqual(row["test_accuracy_head"], 0.85)
            self.assertAlmostEqual(row["test_accuracy_tail"], 0.15)

    def test_another_configuration_trains_again_and_replaces_it(self):
        with tempfile.TemporaryDirectory() as root:
            archive = os.path.join(root, "archive")
            benchmark_grid.run_grid(self.grid, config_lib.ExperimentConfig(),
                                    os.path.join(root, "a"), self._train,
                                    archive=archive)
            changed = config_lib.ExperimentConfig().replace(epochs=7)
            with self.assertLogs(level="WARNING") as logs:
                results = benchmark_grid.run_grid(
                    self.grid, changed, os.path.join(root, "b"), self._train,
                    archive=archive)
            self.assertEqual([r.status for r in results], ["done", "failed"])
            self.assertIn("train.epochs: ", "\n".join(logs.output))
            with open(os.path.join(archive, "runs", "lt", "erm", "seed_0",
                                   "config.json")) as f:
                self.assertEqual(json.load(f)["train"]["epochs"], 7)


def _write_checkpoint(cell_dir, number, global_step, best=b"best"):
    """A stand-in whole-state checkpoint (and best weights) of a cell."""
    checkpoint = os.path.join(cell_dir, "backup", f"ckpt-{number}")
    os.makedirs(checkpoint)
    with open(os.path.join(checkpoint, "state.ckpt.index"), "wb") as f:
        f.write(f"variables at {global_step}".encode())
    with open(os.path.join(checkpoint, "state.json"), "w") as f:
        json.dump({"global_step": global_step, "epoch": global_step // 3,
                   "step_in_epoch": global_step % 3, "history": {}}, f)
    weights = os.path.join(cell_dir, "checkpoints", "best.weights.h5")
    os.makedirs(os.path.dirname(weights), exist_ok=True)
    with open(weights, "wb") as f:
        f.write(best)
    # Written before the checkpoint, as the model selection does.
    written = os.stat(os.path.join(checkpoint, "state.json")).st_mtime
    os.utime(weights, (written - 5, written - 5))
    return checkpoint


class ProgressTest(unittest.TestCase):
    """--grid_save_progress: an unfinished cell resumes in another checkout."""

    def setUp(self):
        self.grid = benchmark_grid.parse_grid(
            ["erm"], ["lt:imbalance_factor=4"], ["0"])
        self.base = config_lib.ExperimentConfig()
        self.config = self.grid.config_for(self.base, self.grid.cells()[0])
        self.seen = []
        self.root = self.enterContext(tempfile.TemporaryDirectory())
        self.archive = os.path.join(self.root, "archive")
        self.relative = os.path.join("runs", "lt", "erm", "seed_0")

    def _cell(self, workdir, config=None):
        cell_dir = os.path.join(workdir, self.relative)
        os.makedirs(cell_dir, exist_ok=True)
        with open(os.path.join(cell_dir, "config.json"), "w") as f:
            f.write((config or self.config).to_json())
        return cell_dir

    def _train(self, config, workdir):
        """Records what a resuming train_lib would resume from."""
        del config
        state = benchmark_grid._latest_state(workdir)  # pylint: disable=protected-access
        with open(os.path.join(workdir, "checkpoints",
                               "best.weights.h5"), "rb") as f:
            self.seen.append((os.path.basename(state["path"]),
                              state["global_step"], f.read()))
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump({"test_accuracy": 0.5}, f)

    def _save(self, workdir, **kwargs):
        return benchmark_grid.save_progress(self.grid, self.base, workdir,
                                            self.archive, **kwargs)

    def test_archived_progress_resumes_in_a_fresh_workdir_then_goes(self):
        first = self._cell(os.path.join(self.root, "a"))
        _write_checkpoint(first, 1, 3, best=b"old")
        _write_checkpoint(first, 2, 6, best=b"epoch 2")
        self.assertEqual(self._save(os.path.join(self.root, "a")), 1)
        # Nothing newer since: the archive's copy stays.
        self.assertEqual(self._save(os.path.join(self.root, "a")), 0)
        progress = os.path.join(self.archive, self.relative,
                                benchmark_grid.PROGRESS_DIR)
        self.assertEqual(sorted(os.listdir(progress)),
                         ["backup", "checkpoints", "config.json"])
        self.assertEqual(os.listdir(os.path.join(progress, "backup")),
                         ["ckpt-1"])

        results = benchmark_grid.run_grid(
            self.grid, self.base, os.path.join(self.root, "b"), self._train,
            archive=self.archive)
        self.assertEqual([r.status for r in results], ["done"])
        self.assertEqual(self.seen, [("ckpt-1", 6, b"epoch 2")])
        # Finished: the archive keeps the records, not the checkpoint.
        self.assertFalse(os.path.exists(progress))
        # A finished cell's stale progress (archived by an older worker)
        # goes at the next save.
        shutil.copytree(os.path.join(self.root, "a", self.relative),
                        progress)
        self.assertEqual(self._save(os.path.join(self.root, "a")), 0)
        self.assertFalse(os.path.exists(progress))
        self.assertTrue(os.path.exists(os.path.join(
            self.archive, self.relative, "metrics.json")))

    def test_the_further_checkpoint_wins_whatever_its_number(self):
        _write_checkpoint(self._cell(os.path.join(self.root, "a")), 2, 6,
                          best=b"archived")
        self._save(os.path.join(self.root, "a"))
        archived = os.path.join(self.archive, self.relative)
        # A local run that got less far but wrote more checkpoints.
        behind = self._cell(os.path.join(self.root, "b"))
        _write_checkpoint(behind, 7, 3, best=b"local")
        self.assertTrue(benchmark_grid.restore_progress(archived, behind,
                                                        self.config))
        ahead = self._cell(os.path.join(self.root, "c"))
        _write_checkpoint(ahead, 1, 9, best=b"local")
        self.assertFalse(benchmark_grid.restore_progress(archived, ahead,
                                                         self.config))
        self._train(None, behind)
        self._train(None, ahead)
        self.assertEqual(self.seen, [("ckpt-8", 6, b"archived"),
                                     ("ckpt-1", 9, b"local")])

    def test_weights_newer_than_the_checkpoint_are_not_archived(self):
        cell_dir = self._cell(os.path.join(self.root, "a"))
        checkpoint = _write_checkpoint(cell_dir, 1, 3)
        weights = os.path.join(cell_dir, "checkpoints", "best.weights.h5")
        written = os.stat(os.path.join(checkpoint, "state.json")).st_mtime
        # The selection wrote the next epoch's best; its checkpoint is due.
        os.utime(weights, (written + 5, written + 5))
        self.assertEqual(self._save(os.path.join(self.root, "a"),
                                    wait_s=0), 0)
        os.utime(weights, (written, written))
        self.assertEqual(self._save(os.path.join(self.root, "a"),
                                    wait_s=0), 1)

    def test_a_checkpoint_pruned_mid_copy_gives_way_to_the_newer_one(self):
        cell_dir = self._cell(os.path.join(self.root, "a"))
        old = _write_checkpoint(cell_dir, 1, 3)
        copy = benchmark_grid._copy_checkpoint  # pylint: disable=protected-access

        def pruned_while_copying(state, *args):
            if state["path"] == old:
                # The worker writes the next checkpoint and prunes this one.
                _write_checkpoint(cell_dir, 2, 6)
                shutil.rmtree(old)
            return copy(state, *args)

        with mock.patch.object(benchmark_grid, "_copy_checkpoint",
                               pruned_while_copying):
            self.assertEqual(self._save(os.path.join(self.root, "a")), 1)
        progress = os.path.join(self.archive, self.relative,
                                benchmark_grid.PROGRESS_DIR)
        self.assertEqual(
            benchmark_grid._latest_state(progress)["global_step"], 6)  # pylint: disable=protected-access
        self.assertFalse(os.path.exists(progress + ".tmp"))

    def test_another_configuration_is_neither_archived_nor_resumed(self):
        changed = self.config.replace(epochs=7)
        _write_checkpoint(self._cell(os.path.join(self.root, "a"),
                                     config=changed), 1, 3)
        with self.assertLogs(level="WARNING") as logs:
            self.assertEqual(self._save(os.path.join(self.root, "a")), 0)
        self.assertIn("train.epochs: ", "\n".join(logs.output))

        archived = self._cell(os.path.join(self.root, "b"))
        _write_checkpoint(archived, 1, 3)
        self.assertEqual(self._save(os.path.join(self.root, "b")), 1)
        with self.assertLogs(level="WARNING") as logs:
            resumed = benchmark_grid.restore_progress(
                os.path.join(self.archive, self.relative),
                os.path.join(self.root, "c", self.relative), changed)
        self.assertFalse(resumed)
        self.assertIn("not resumed from", "\n".join(logs.output))
        self.assertFalse(os.path.exists(os.path.join(self.root, "c")))

    def test_command_line_needs_an_archive(self):
        result = _run("--flagfile=configs/benchmark/smoke.flags",
                      f"--workdir={self.root}", "--grid_save_progress")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--grid_archive=<folder>", result.stderr)


class KilledCellResumesElsewhereTest(unittest.TestCase):
    """A real grid killed mid-cell resumes from its archive in a new workdir."""

    def test_killed_cell_resumes_from_archived_progress(self):
        grid = ("--flagfile=configs/benchmark/smoke.flags",
                "--grid_methods=erm", "--epochs=3", "--steps_per_epoch=2")
        with tempfile.TemporaryDirectory() as root:
            first, archive = os.path.join(root, "a"), os.path.join(root, "z")
            backup = os.path.join(first, "runs", "uniform40", "erm",
                                  "seed_0", "backup")
            process = subprocess.Popen(
                [sys.executable, "-m", "pipelines.benchmark", *grid,
                 f"--workdir={first}"], cwd=REPO,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 300
            try:
                # Killed once epoch 1's checkpoint exists, before epoch 3's.
                while (time.time() < deadline and process.poll() is None
                       and not glob.glob(os.path.join(backup, "ckpt-*"))):
                    time.sleep(0.02)
                process.kill()
            finally:
                process.wait()
            self.assertFalse(os.path.exists(os.path.join(
                os.path.dirname(backup), "metrics.json")), "finished first")
            saved = _run(*grid, f"--workdir={first}", "--grid_save_progress",
                         f"--grid_archive={archive}")
            self.assertEqual(saved.returncode, 0, saved.stderr[-3000:])
            self.assertIn("Progress of 1 unfinished cells", saved.stdout)

            second = _run(*grid, f"--workdir={os.path.join(root, 'b')}",
                          f"--grid_archive={archive}")
            self.assertEqual(second.returncode, 0, second.stderr[-3000:])
            self.assertIn("resumes from archived progress", second.stderr)
            self.assertIn("Resumed from", second.stderr)
            with open(os.path.join(root, "b", "runs", "uniform40", "erm",
                                   "seed_0", "metrics.json")) as f:
                metrics = json.load(f)
            # Every epoch is in the history, the killed run's included.
            self.assertEqual(len(metrics["val_accuracy_per_epoch"]), 3)
            self.assertFalse(os.path.exists(os.path.join(
                archive, "runs", "uniform40", "erm", "seed_0",
                benchmark_grid.PROGRESS_DIR)))


class WorkersTest(unittest.TestCase):
    """Several workers on one grid: a held cell is passed over, not shared."""

    HOLD = ("import fcntl, sys, time\n"
            "f = open(sys.argv[1], 'a')\n"
            "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")

    def test_a_cell_held_by_a_live_worker_is_left_to_it(self):
        grid = benchmark_grid.parse_grid(["erm", "focal"],
                                         ["s:noise_type=none"], ["0"])
        trained = []

        def train(config, workdir):
            trained.append(config.method.method)
            with open(os.path.join(workdir, "metrics.json"), "w") as f:
                json.dump({"test_accuracy": 0.5}, f)

        base = config_lib.ExperimentConfig()
        with tempfile.TemporaryDirectory() as workdir:
            erm_dir = os.path.join(workdir, "runs", "s", "erm", "seed_0")
            os.makedirs(erm_dir)
            # Another process (the other worker) holds erm's lock.
            other = subprocess.Popen(
                [sys.executable, "-c", self.HOLD,
                 os.path.join(erm_dir, benchmark_grid.GRID_LOCK_FILE)],
                stdout=subprocess.PIPE, text=True)
            try:
                self.assertEqual(other.stdout.readline().strip(), "held")
                results = benchmark_grid.run_grid(grid, base, workdir, train)
                self.assertEqual([r.status for r in results],
                                 ["busy", "done"])
                self.assertEqual(trained, ["focal"])
            finally:
                # A worker killed mid-cell leaves no stale claim.
                other.kill()
                other.wait()
                other.stdout.close()
            results = benchmark_grid.run_grid(grid, base, workdir, train)
            self.assertEqual([r.status for r in results],
                             ["done", "skipped"])
            self.assertEqual(trained, ["focal", "erm"])

    def test_a_cell_finished_while_waiting_for_its_lock_is_not_retrained(
            self):
        grid = benchmark_grid.parse_grid(["erm"], ["s:noise_type=none"],
                                         ["0"])
        with tempfile.TemporaryDirectory() as workdir:
            cell_dir = os.path.join(workdir, "runs", "s", "erm", "seed_0")
            real_lock = benchmark_grid.cell_lock

            def lock_after_other_worker_finished(path):
                # The other worker writes metrics.json between this
                # worker's first check and its taking the lock.
                with open(os.path.join(path, "metrics.json"), "w") as f:
                    json.dump({"test_accuracy": 0.5}, f)
                return real_lock(path)

            os.makedirs(cell_dir)
            benchmark_grid.cell_lock = lock_after_other_worker_finished
            try:
                results = benchmark_grid.run_grid(
                    grid, config_lib.ExperimentConfig(), workdir,
                    lambda config, workdir: self.fail("trained again"))
            finally:
                benchmark_grid.cell_lock = real_lock
            self.assertEqual([r.status for r in results], ["skipped"])


class HeadTailAndDiagnosticsTest(unittest.TestCase):
    """The report's head / tail accuracy and LFM-DR diagnostics columns."""

    def test_tail_is_below_the_median_count_and_absent_classes_are_skipped(
            self):
        np.testing.assert_array_equal(
            benchmark_grid.tail_classes([100, 50, 10, 5]),
            [False, False, True, True])
        self.assertFalse(benchmark_grid.tail_classes([40, 40, 40]).any())
        head, tail = benchmark_grid.head_tail_accuracy(
            [1.0, 0.8, 0.2, None], [100, 50, 10, 5])
        self.assertAlmostEqual(head, 0.9)
        self.assertAlmostEqual(tail, 0.2)
        # Balanced counts: no tail class, so no tail accuracy.
        self.assertEqual(benchmark_grid.head_tail_accuracy(
            [0.5, 0.7], [10, 10]), (0.6, None))

    def _lfm_metrics(self):
        per_epoch = {"b_alignment": [-0.5, 0.1, 0.7]}
        for i, name in enumerate(("a_clean", "a_corrupted", "b_clean",
                                  "b_corrupted", "a_head", "a_tail",
                                  "b_head", "b_tail")):
            per_epoch[name] = [0.0, float(i + 1)]
        return {"train_metrics_per_epoch": per_epoch,
                "train_noise_rate": 0.4}

    def test_diagnostics_keep_only_the_groups_the_setting_has(self):
        noisy = {"data": {"imbalance_factor": 1.0},
                 "method": {"diagnostics_every": 50}}
        values = benchmark_grid.lfm_diagnostics(self._lfm_metrics(), noisy)
        self.assertAlmostEqual(values["mean_b_alignment"], 0.1)
        # The last epoch's values, clean / noisy only under label noise.
        self.assertEqual(values["last_epoch_a_clean"], 1.0)
        self.assertEqual(values["last_epoch_b_corrupted"], 4.0)
        self.assertIsNone(values["last_epoch_a_head"])
        long_tail = {"data": {"imbalance_factor": 20.0},
                     "method": {"diagnostics_every": 50}}
        metrics = dict(self._lfm_metrics(), train_noise_rate=0.0)
        values = benchmark_grid.lfm_diagnostics(metrics, long_tail)
        self.assertIsNone(values["last_epoch_a_clean"])
        self.assertEqual(values["last_epoch_b_tail"], 8.0)
        # Never computed: the tracked zeros are not an alignment.
        off = {"data": {"imbalance_factor": 1.0},
               "method": {"diagnostics_every": 0}}
        self.assertIsNone(benchmark_grid.lfm_diagnostics(
            self._lfm_metrics(), off)["mean_b_alignment"])
        # Not an LFM-DR run.
        self.assertEqual(benchmark_grid.lfm_diagnostics(
            {"train_metrics_per_epoch": {"loss": [1.0]}}, noisy), {})

    def test_alignment_plot_only_where_runs_computed_it(self):
        grid = benchmark_grid.parse_grid(
            ["erm", "lfm"], ["s:noise_type=uniform;noise_rate=0.4"],
            ["0", "1"])
        with tempfile.TemporaryDirectory() as workdir:
            rows = _rows({"erm": [0.7, 0.8], "lfm": [0.6, 0.6]})
            config = {"data": {"imbalance_factor": 1.0},
                      "method": {"diagnostics_every": 50}}
            for row in rows:
                metrics = ({"train_metrics_per_epoch": {"loss": [1.0]}}
                           if row["method"] == "erm" else self._lfm_metrics())
                # What `collect_rows` keeps of each run for the plot.
                row["_alignment"] = benchmark_grid.alignment_curve(metrics,
                                                                   config)
            path = os.path.join(workdir, "alignment.png")
            self.assertEqual(benchmark_grid.plot_alignment(grid, rows, path),
                             path)
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), PNG_SIGNATURE)
            self.assertIsNone(benchmark_grid.plot_alignment(
                grid, rows[:2], os.path.join(workdir, "none.png")))
            self.assertFalse(os.path.exists(os.path.join(workdir,
                                                         "none.png")))

    def test_markdown_has_head_tail_and_diagnostics_tables(self):
        grid = benchmark_grid.parse_grid(
            ["erm", "lfm"], ["lt:imbalance_factor=20"], ["0", "1"])
        rows = _rows({"erm": [0.7, 0.8], "lfm": [0.6, 0.6]}, setting="lt")
        for row, head, tail in zip(rows, (0.9, 0.8, 0.7, 0.5),
                                   (0.1, 0.3, 0.4, 0.6)):
            row.update(dict.fromkeys(benchmark_grid.DIAGNOSTIC_FIELDS),
                       test_accuracy_head=head, test_accuracy_tail=tail)
        rows[2]["mean_b_alignment"] = -0.25
        rows[3]["mean_b_alignment"] = 0.75
        markdown = benchmark_grid.results_markdown(grid, rows, "box")
        self.assertIn("| method | lt head | lt tail |", markdown)
        self.assertIn("| erm | 85.00 ± 7.07 | 20.00 ± 14.14 |", markdown)
        self.assertIn("| lt | lfm | 0.250 ± 0.707 |", markdown)
        # A column no run fills is left out.
        self.assertNotIn("a clean", markdown)


class GridEntryTest(unittest.TestCase):

    def test_variants_and_settings_parse_to_typed_overrides(self):
        method = benchmark_grid.parse_entry(
            "method", "lfm_ps:method=lfm;encoder=shared;use_mistakes=false")
        self.assertEqual(method.overrides, (
            ("method", "lfm"), ("encoder", "shared"),
            ("use_mistakes", False)))
        self.assertEqual(benchmark_grid.parse_entry("method", "erm")
                         .overrides, (("method", "erm"),))
        setting = benchmark_grid.parse_entry(
            "setting", "flip40:noise_type=flip;noise_rate=0.4")
        self.assertEqual(setting.overrides,
                         (("noise_type", "flip"), ("noise_rate", 0.4)))
        # `none` is a choice of noise_type, None only for optional fields.
        setting = benchmark_grid.parse_entry(
            "setting", "lt:noise_type=none;max_train_per_class=none")
        self.assertEqual(setting.overrides, (
            ("noise_type", "none"), ("max_train_per_class", None)))

    def test_relative_method_values_scale_each_setting(self):
        grid = benchmark_grid.parse_grid(
            ["erm_2x:method=erm;epochs=x2;w1_learning_rate=x1.5;"
             "drw_start_epoch=x0.8*epochs"],
            ["lt:imbalance_factor=20;epochs=6",
             "noise:noise_type=uniform;noise_rate=0.4"],
            ["0"], config_lib.ExperimentConfig().replace(epochs=4))
        configs = [grid.config_for(config_lib.ExperimentConfig().replace(
            epochs=4), cell) for cell in grid.cells()]
        self.assertEqual([c.train.epochs for c in configs], [12, 8])
        # 0.8 of the setting's epochs (before the method doubles them).
        self.assertEqual([c.loss.drw_start_epoch for c in configs], [5, 3])
        self.assertAlmostEqual(configs[1].optimizer.w1_learning_rate,
                               1.5 * config_lib.OptimizerConfig()
                               .w1_learning_rate)
        self.assertEqual(grid.methods[0].describe(),
                         "erm_2x:method=erm;epochs=x2;w1_learning_rate=x1.5;"
                         "drw_start_epoch=x0.8*epochs")

    def test_bad_entries_name_the_value_and_the_fix(self):
        cases = [
            ("method", "magic", "'magic' is not a method"),
            ("method", "v:nosuchflag=1", "'nosuchflag' is not a config"),
            ("setting", "if100", "at least one field=value"),
            ("setting", "if100:imbalance_factor=big",
             "'big' is not a valid float"),
            ("setting", "x:method=lfm", "may not choose the method"),
            ("method", "v:method=erm;epochs=x2*noise_type",
             "'noise_type' in 'x2*noise_type' is not a numeric"),
        ]
        for kind, text, problem in cases:
            with self.assertRaises(ValueError) as caught:
                benchmark_grid.parse_entry(kind, text)
            message = str(caught.exception)
            self.assertIn(repr(text), message)
            self.assertIn(problem, message)
            self.assertIn(f"fix the entry in --grid_{kind}s", message)

    def test_invalid_cell_config_fails_before_any_training(self):
        with self.assertRaises(ValueError) as caught:
            benchmark_grid.parse_grid(
                ["erm"], ["bad:noise_type=uniform;noise_rate=1.5"], ["0"])
        self.assertIn("noise_rate=1.5", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            benchmark_grid.parse_grid(["erm", "erm"], ["s:noise_rate=0"],
                                      ["0"])
        self.assertIn("repeated names ['erm']", str(caught.exception))

    def test_command_line_bad_entry_writes_nothing(self):
        with tempfile.TemporaryDirectory() as parent:
            workdir = os.path.join(parent, "never")
            result = _run("--flagfile=configs/benchmark/smoke.flags",
                          "--grid_methods=erm,lfm_typo:encoder=shared",
                          f"--workdir={workdir}")
            self.assertNotEqual(result.returncode, 0)
            self.assertIn("'lfm_typo:encoder=shared'", result.stderr)
            self.assertIn("fix the entry in --grid_methods", result.stderr)
            self.assertFalse(os.path.exists(workdir))

    def test_grid_first_trains_the_named_methods_at_every_seed_first(self):
        grid = benchmark_grid.parse_grid(
            ["erm", "focal", "lfm"], ["a:noise_type=none", "b:noise_type=none"],
            ["0", "1"])
        order = [(c.method.name, c.setting.name, c.seed)
                 for c in grid.training_order(["lfm", "erm"])]
        # The named methods' cells keep the grid's own (seed-major) order.
        self.assertEqual(order[:8], [
            ("erm", "a", 0), ("lfm", "a", 0), ("erm", "b", 0), ("lfm", "b", 0),
            ("erm", "a", 1), ("lfm", "a", 1), ("erm", "b", 1), ("lfm", "b", 1)])
        self.assertEqual(order[8:], [("focal", "a", 0), ("focal", "b", 0),
                                     ("focal", "a", 1), ("focal", "b", 1)])
        self.assertEqual(sorted(order), sorted(
            (c.method.name, c.setting.name, c.seed) for c in grid.cells()))
        trained = []

        def train(config, workdir):
            trained.append(os.path.relpath(workdir, root))
            with open(os.path.join(workdir, "metrics.json"), "w") as f:
                json.dump({"test_accuracy": 0.5}, f)

        with tempfile.TemporaryDirectory() as root:
            benchmark_grid.run_grid(grid, config_lib.ExperimentConfig(),
                                    root, train, first=["focal"])
        self.assertEqual(trained[:4], [
            os.path.join("runs", s, "focal", f"seed_{k}")
            for k in (0, 1) for s in ("a", "b")])
        self.assertEqual(len(trained), 12)

    def test_command_line_unknown_grid_first_writes_nothing(self):
        with tempfile.TemporaryDirectory() as parent:
            workdir = os.path.join(parent, "never")
            result = _run("--flagfile=configs/benchmark/smoke.flags",
                          "--grid_first=erm,lfmm", f"--workdir={workdir}")
            self.assertNotEqual(result.returncode, 0)
            self.assertIn("--grid_first=erm,lfmm, whose lfmm is not a method",
                          result.stderr)
            self.assertFalse(os.path.exists(workdir))


class ShippedGridsTest(unittest.TestCase):
    """Every configs/benchmark/*.flags parses into a grid of valid cells."""

    def test_every_grid_flagfile_parses(self):
        from absl import flags  # pylint: disable=g-import-not-at-top
        from pipelines import benchmark  # pylint: disable=g-import-not-at-top
        from pipelines import flags as flags_lib  # pylint: disable=g-import-not-at-top
        paths = sorted(
            os.path.join("configs", "benchmark", name)
            for name in os.listdir(os.path.join(REPO, "configs", "benchmark"))
            # The NAS protocol's flagfiles carry pipelines.nas_benchmark's
            # flags; tests/pipelines/nas_benchmark_test.py parses them.
            if name.endswith(".flags") and "nas" not in name)
        self.assertIn(os.path.join("configs", "benchmark", "cpu_ablation.flags"),
                      paths)
        for path in paths:
            with self.subTest(path=path):
                values = flags.FlagValues()
                flags_lib.define_flags(values)
                benchmark.define_grid_flags(values)
                cwd = os.getcwd()
                os.chdir(REPO)
                try:
                    values(["prog", f"--flagfile={path}"])
                finally:
                    os.chdir(cwd)
                base = flags_lib.config_from_flags(values=values)
                # parse_grid validates every cell's config.
                grid = benchmark_grid.parse_grid(
                    values.grid_methods, values.grid_settings,
                    values.grid_seeds, base)
                self.assertGreater(len(grid.cells()), 0)
                grid.check_comparison(values.grid_compare,
                                      values.grid_controls)


if __name__ == "__main__":
    unittest.main()
