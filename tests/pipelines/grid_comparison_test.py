"""lfm_tf.grid_comparison: paired differences and the plain verdicts."""

import os
import subprocess
import sys
import tempfile
import unittest

from lfm_tf import benchmark_grid
from lfm_tf import grid_comparison

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _row(setting, method, seed, accuracy, status="done"):
    return {"setting": setting, "method": method, "seed": seed,
            "status": status, "wall_time_s": None,
            "test_accuracy": accuracy if status == "done" else None}


class PairedDifferencesTest(unittest.TestCase):

    def test_pairs_by_seed_and_drops_unpaired_seeds(self):
        rows = [_row("lt", "lfm", 0, 0.60), _row("lt", "lfm", 1, 0.50),
                _row("lt", "lfm", 2, 0.70),
                _row("lt", "erm", 0, 0.55), _row("lt", "erm", 1, 0.52),
                _row("lt", "erm", 2, None, status="pending"),
                _row("noise", "erm", 0, 0.10)]
        differences = grid_comparison.paired_differences(rows, "lt", "lfm",
                                                         "erm")
        # Seed 2 has no finished control; the other setting is not mixed in.
        self.assertEqual(len(differences), 2)
        self.assertAlmostEqual(differences[0], 5.0)
        self.assertAlmostEqual(differences[1], -2.0)

    def test_pairing_removes_the_split_shared_by_a_seed(self):
        # Seed 1's split is 20 points harder for both arms: unpaired, the
        # spread of the means hides a gain the paired difference shows.
        rows = [_row("s", "lfm", 0, 0.81), _row("s", "lfm", 1, 0.61),
                _row("s", "erm", 0, 0.80), _row("s", "erm", 1, 0.60)]
        text = grid_comparison.difference_text(
            grid_comparison.paired_differences(rows, "s", "lfm", "erm"))
        self.assertEqual(text, "+1.00 ± 0.00 (2) ▲")

    def test_agreement_needs_two_seeds_of_one_sign(self):
        self.assertIsNone(grid_comparison.agreement([3.0]))
        self.assertEqual(grid_comparison.agreement([0.5, 2.0]), "above")
        self.assertEqual(grid_comparison.agreement([-0.5, -2.0, -0.1]),
                         "below")
        self.assertIsNone(grid_comparison.agreement([-0.5, 2.0]))
        # 0.004 prints as +0.00: not counted as above.
        self.assertIsNone(grid_comparison.agreement([0.004, 2.0]))
        self.assertEqual(grid_comparison.difference_text([]), "–")
        self.assertEqual(grid_comparison.difference_text([-4.25]),
                         "-4.25 (1)")


class VerdictTest(unittest.TestCase):

    def test_names_every_control_the_arm_loses_to(self):
        line = grid_comparison.verdict_line(
            "if100", "lfm", [("erm_2x", [1.8, 2.0]),
                             ("logit_adjusted", [-4.3, -1.0]),
                             ("ldam_drw", [-2.4]), ("gce", [])])
        self.assertTrue(line.startswith("- if100, `lfm`: **below** "
                                        "logit_adjusted (-2.65, 2 seeds, "
                                        "below on every one) and ldam_drw "
                                        "(-2.40, one seed); above erm_2x"),
                        line)
        self.assertNotIn("gce", line)

    def test_says_when_it_loses_to_none(self):
        line = grid_comparison.verdict_line(
            "flip40", "lfm", [("erm_2x", [7.3, -1.0])])
        self.assertEqual(
            line, "- flip40, `lfm`: above erm_2x (+3.15, 2 seeds, the seeds "
            "disagreeing): it loses to no control that has run.")

    def test_comparison_lines_table_and_sentences(self):
        rows = [_row("a", "lfm", 0, 0.50), _row("a", "erm", 0, 0.52),
                _row("a", "lfm_a1", 0, 0.49),
                _row("b", "lfm", 0, None, status="pending"),
                _row("b", "erm", 0, 0.40)]
        lines = grid_comparison.comparison_lines(
            rows, ["a", "b"], ["lfm", "lfm_a1"], ["erm", "lfm_a1"])
        text = "\n".join(lines)
        self.assertIn("| a | lfm | -2.00 (1) | +1.00 (1) |", text)
        self.assertIn("| a | lfm_a1 | -3.00 (1) | (itself) |", text)
        self.assertIn("- a, `lfm`: **below** erm (-2.00, one seed); above "
                      "lfm_a1 (+1.00, one seed).", text)
        # Setting b has no finished LFM cell: no row, no sentence.
        self.assertNotIn("| b |", text)
        self.assertNotIn("- b,", text)
        self.assertEqual(grid_comparison.comparison_lines(rows, ["a"], [],
                                                          []), [])

    def test_results_markdown_carries_the_comparison(self):
        grid = benchmark_grid.parse_grid(
            ["erm", "lfm"], ["s:noise_type=none"], ["0"])
        rows = [_row("s", "erm", 0, 0.6), _row("s", "lfm", 0, 0.5)]
        markdown = benchmark_grid.results_markdown(
            grid, rows, "box", compare=["lfm"], controls=["erm"])
        self.assertIn("- s, `lfm`: **below** erm (-10.00, one seed).",
                      markdown)
        self.assertNotIn("`--grid_compare`",
                         benchmark_grid.results_markdown(grid, rows, "box"))


class ValidateTest(unittest.TestCase):

    def test_unknown_or_lone_names_raise_with_the_fix(self):
        grid = benchmark_grid.parse_grid(["erm", "lfm"], ["s:noise_type=none"],
                                         ["0"])
        with self.assertRaisesRegex(ValueError, "--grid_controls=erm,ermm, "
                                    "whose ermm is not a method"):
            grid.check_comparison(["lfm"], ["erm", "ermm"])
        with self.assertRaisesRegex(ValueError, "--grid_compare without "
                                    "--grid_controls"):
            grid.check_comparison(["lfm"], [])
        grid.check_comparison([], [])
        grid.check_comparison(["lfm"], ["erm"])

    def test_command_line_unknown_control_writes_nothing(self):
        with tempfile.TemporaryDirectory() as parent:
            workdir = os.path.join(parent, "never")
            result = subprocess.run(
                [sys.executable, "-m", "pipelines.benchmark",
                 "--flagfile=configs/benchmark/smoke.flags",
                 "--grid_compare=lfm", "--grid_controls=erm_2x",
                 f"--workdir={workdir}"], cwd=REPO, capture_output=True,
                text=True, timeout=600, check=False)
            self.assertNotEqual(result.returncode, 0)
            self.assertIn("--grid_controls=erm_2x, whose erm_2x is not a "
                          "method", result.stderr)
            self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
    unittest.main()
