"""Splits: long-tail formula, noise, disjointness, determinism, bad input."""

import dataclasses
import os
import re

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf import config as config_lib
from lfm_tf.data import splits as splits_lib


def _labels(per_class, num_classes, seed=0):
    """A shuffled label vector with `per_class` examples of each class."""
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def _config(**overrides):
    return config_lib.DataConfig(**overrides)


class LongTailCountsTest(tf.test.TestCase, parameterized.TestCase):

    # lfm_reference §3: img_max = (50000 - C * 10) / C, and its table.
    @parameterized.parameters(
        (4990, 10, 10, 499, 20391),
        (4990, 10, 100, 49, 12380),
        (4990, 10, 200, 24, 11177),
        (490, 100, 10, 49, 19183),
        (490, 100, 100, 4, 10626),
        (490, 100, 200, 2, 9304),
    )
    def test_reference_table(self, n_max, classes, factor, tail, total):
        counts = splits_lib.long_tail_counts(n_max, classes, factor)
        self.assertEqual(counts.dtype, np.int64)
        self.assertEqual(counts[0], n_max)
        self.assertEqual(counts[-1], tail)
        self.assertEqual(counts.sum(), total)

    def test_formula_per_class(self):
        counts = splits_lib.long_tail_counts(4990, 10, 100)
        expected = [int(4990 * 100 ** (-c / 9)) for c in range(10)]
        self.assertAllEqual(counts, expected)
        self.assertAllEqual(splits_lib.long_tail_counts(7, 4, 1), [7] * 4)
        self.assertAllEqual(splits_lib.long_tail_counts(7, 1, 5), [7])

    def test_rejects_factor_below_one(self):
        with self.assertRaisesRegex(ValueError,
                                    r"imbalance_factor=0.01.*>= 1"):
            splits_lib.long_tail_counts(100, 10, 0.01)

    def test_rejects_emptied_class(self):
        # floor(50 * 100^(-8/9)) = 0: class 8 is the first left empty.
        with self.assertRaisesRegex(ValueError,
                                    "leaves class 8 empty.*--imbalance"):
            splits_lib.long_tail_counts(50, 10, 100)


class NoiseTransitionTest(tf.test.TestCase, parameterized.TestCase):

    def test_uniform(self):
        matrix = splits_lib.noise_transition("uniform", 0.4, 5)
        expected = np.full((5, 5), 0.1)
        np.fill_diagonal(expected, 0.6)
        self.assertAllClose(matrix, expected)

    def test_flip_to_next_class_by_default(self):
        matrix = splits_lib.noise_transition("flip", 0.3, 4)
        expected = 0.7 * np.eye(4) + 0.3 * np.roll(np.eye(4), 1, axis=1)
        self.assertAllClose(matrix, expected)

    def test_flip2_to_two_next_classes_by_default(self):
        matrix = splits_lib.noise_transition("flip2", 0.4, 5)
        self.assertAllClose(matrix[3], [0.2, 0.0, 0.0, 0.6, 0.2])

    def test_given_pairing(self):
        similar = np.array([[2, 1], [3, 0], [0, 3], [1, 2]])
        matrix = splits_lib.noise_transition("flip", 0.3, 4,
                                             similar=similar)
        self.assertAllClose(matrix[0], [0.7, 0.0, 0.3, 0.0])
        matrix = splits_lib.noise_transition("flip2", 0.3, 4,
                                             similar=similar)
        self.assertAllClose(matrix[1], [0.15, 0.7, 0.0, 0.15])

    @parameterized.parameters(("none", 0.0), ("uniform", 0.0),
                              ("flip", 0.0))
    def test_identity_without_noise(self, noise_type, rate):
        self.assertAllEqual(
            splits_lib.noise_transition(noise_type, rate, 6), np.eye(6))

    @parameterized.parameters("uniform", "flip", "flip2")
    def test_rows_are_distributions(self, noise_type):
        matrix = splits_lib.noise_transition(noise_type, 0.45, 10)
        self.assertEqual(matrix.shape, (10, 10))
        self.assertEqual(matrix.dtype, np.float64)
        self.assertAllClose(matrix.sum(axis=1), np.ones(10))
        self.assertAllClose(np.diag(matrix), np.full(10, 0.55))
        self.assertTrue(np.all(matrix >= 0))

    @parameterized.parameters(1.0, -0.1, 1.5)
    def test_rejects_rate_outside_unit_interval(self, rate):
        with self.assertRaisesRegex(ValueError,
                                    rf"noise_rate={rate}.*\[0, 1\)"):
            splits_lib.noise_transition("uniform", rate, 10)

    def test_rejects_bad_type_and_too_few_classes(self):
        with self.assertRaisesRegex(ValueError, "noise_type='sym'"):
            splits_lib.noise_transition("sym", 0.2, 10)
        with self.assertRaisesRegex(ValueError, "at least 3"):
            splits_lib.noise_transition("flip2", 0.2, 2)

    def test_rejects_bad_pairing(self):
        with self.assertRaisesRegex(ValueError, "differ from their own"):
            splits_lib.noise_transition(
                "flip", 0.2, 3, similar=np.array([[0], [2], [0]]))
        with self.assertRaisesRegex(ValueError, r"shape \(3, 1\)"):
            splits_lib.noise_transition(
                "flip2", 0.2, 3, similar=np.array([[1], [2], [0]]))


class CorruptionTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters("uniform", "flip", "flip2")
    def test_realised_noise_matches_the_asked_rate(self, noise_type):
        clean = _labels(1000, 10)  # 10k examples.
        matrix = splits_lib.noise_transition(noise_type, 0.4, 10)
        noisy = splits_lib.corrupt_labels(clean, matrix,
                                          np.random.default_rng(3))
        self.assertEqual(noisy.dtype, np.int64)
        # Binomial(10000, 0.4) has a standard deviation of 0.005.
        self.assertAllClose(np.mean(noisy != clean), 0.4, atol=0.02)
        realised = splits_lib.realised_transition(clean, noisy, 10)
        self.assertAllClose(realised, matrix, atol=0.05)
        # Never a transition the matrix forbids.
        self.assertTrue(np.all(realised[matrix == 0] == 0))

    def test_identity_keeps_labels(self):
        clean = _labels(50, 7)
        noisy = splits_lib.corrupt_labels(clean, np.eye(7),
                                          np.random.default_rng(0))
        self.assertAllEqual(noisy, clean)

    def test_realised_transition_by_hand(self):
        realised = splits_lib.realised_transition(
            np.array([0, 0, 0, 0, 1]), np.array([0, 1, 1, 2, 1]), 3)
        # Row 2 has no examples: an identity row.
        self.assertAllClose(realised, [[0.25, 0.5, 0.25],
                                       [0.0, 1.0, 0.0],
                                       [0.0, 0.0, 1.0]])

    def test_realised_transition_rejects_mismatched_lengths(self):
        with self.assertRaisesRegex(ValueError, "3 clean but 2 noisy"):
            splits_lib.realised_transition(np.array([0, 1, 1]),
                                           np.array([0, 1]), 2)


class SimilarClassesTest(tf.test.TestCase):

    def test_mean_image_neighbours(self):
        rng = np.random.default_rng(0)
        # Classes 0 and 2 are bright on the left, 1 and 3 on the right.
        patterns = np.zeros((4, 4, 4, 3))
        patterns[[0, 2], :, :2] = 200
        patterns[[1, 3], :, 2:] = 200
        labels = np.repeat(np.arange(4), 20)
        noise = rng.normal(0, 20, (80, 4, 4, 3))
        images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
        similar = splits_lib.similar_classes(images, labels, 4)
        self.assertEqual(similar.shape, (4, 2))
        self.assertAllEqual(similar[:, 0], [2, 3, 0, 1])
        self.assertTrue(np.all(similar != np.arange(4)[:, None]))


class MakeSplitsTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.labels = _labels(200, 10)  # 2000 examples.
        self.config = _config(num_meta_per_class=10, imbalance_factor=10,
                              noise_type="flip", noise_rate=0.3, seed=7)

    def _splits(self, **overrides):
        config = dataclasses.replace(self.config, **overrides)
        return splits_lib.make_splits(self.labels, 10, config)

    def test_disjoint_sets(self):
        result = self._splits()
        train, meta, test = (set(result.train_index), set(result.meta_index),
                             set(result.test_index))
        self.assertLen(train, len(result.train_index))  # No duplicates.
        self.assertEmpty(train & meta)
        self.assertEmpty(train & test)
        self.assertEmpty(meta & test)
        everything = np.concatenate([result.train_index, result.meta_index,
                                     result.test_index])
        self.assertBetween(everything.min(), 0, len(self.labels) - 1)
        self.assertBetween(everything.max(), 0, len(self.labels) - 1)
        for name in ("train_index", "train_labels", "train_clean_labels",
                     "meta_index", "meta_labels", "test_index"):
            self.assertEqual(getattr(result, name).dtype, np.int64, name)

    def test_stratified_test_set_is_carved_first(self):
        result = self._splits(test_fraction=0.25)
        self.assertTrue(result.test_from_train)
        self.assertAllEqual(np.bincount(self.labels[result.test_index]),
                            np.full(10, 50))

    def test_test_set_cap_is_exact_and_stratified(self):
        result = self._splits(max_test_examples=55)
        counts = np.bincount(self.labels[result.test_index], minlength=10)
        self.assertEqual(counts.sum(), 55)
        self.assertLessEqual(counts.max() - counts.min(), 1)

    def test_meta_is_clean_and_balanced_despite_noise(self):
        result = self._splits(noise_type="uniform", noise_rate=0.8)
        self.assertAllEqual(np.bincount(result.meta_labels), np.full(10, 10))
        self.assertAllEqual(result.meta_labels,
                            self.labels[result.meta_index])
        self.assertGreater(np.mean(result.is_corrupted), 0.7)

    def test_long_tail_follows_formula_with_defined_n_max(self):
        result = self._splits()
        # n_max = class 0's examples left after test (40) and meta (10).
        clean_counts = np.bincount(result.train_clean_labels, minlength=10)
        expected = [int(150 * 10 ** (-c / 9)) for c in range(10)]
        self.assertAllEqual(clean_counts, expected)

    def test_n_max_is_class_zero_not_the_smallest_class(self):
        labels = _labels([220] + [200] * 9, 10)
        result = splits_lib.make_splits(labels, 10, self.config)
        # Class 0: 220 - 44 test - 10 meta = 166 left; the others have 150.
        self.assertAllEqual(
            np.bincount(result.train_clean_labels, minlength=10),
            [int(166 * 10 ** (-c / 9)) for c in range(10)])

    def test_a_class_short_of_the_tail_keeps_what_it_has(self):
        labels = _labels([300] + [200] * 9, 10)
        with self.assertLogs(level="WARNING") as logs:
            result = splits_lib.make_splits(labels, 10, self.config)
        self.assertIn("only [150] are left", logs.output[0])
        # n_max = 300 - 60 - 10 = 230 wants 178 of class 1, which has 150.
        expected = [int(230 * 10 ** (-c / 9)) for c in range(10)]
        expected[1] = 150
        self.assertAllEqual(
            np.bincount(result.train_clean_labels, minlength=10), expected)

    def test_max_train_per_class_caps_n_max(self):
        result = self._splits(max_train_per_class=60)
        self.assertAllEqual(
            np.bincount(result.train_clean_labels, minlength=10),
            splits_lib.long_tail_counts(60, 10, 10))

    def test_balanced_keeps_everything_left(self):
        result = self._splits(imbalance_factor=1, noise_type="none",
                              noise_rate=0.0)
        self.assertAllEqual(np.bincount(result.train_clean_labels),
                            np.full(10, 150))
        capped = self._splits(imbalance_factor=1, max_train_per_class=30)
        self.assertAllEqual(np.bincount(capped.train_clean_labels),
                            np.full(10, 30))

    def test_noise_only_on_training_labels(self):
        result = self._splits()
        self.assertAllEqual(result.train_clean_labels,
                            self.labels[result.train_index])
        corrupted = result.is_corrupted
        self.assertAllEqual(corrupted,
                            result.train_labels != result.train_clean_labels)
        # Flip noise goes to (c + 1) mod C by default.
        self.assertAllEqual(result.train_labels[corrupted],
                            (result.train_clean_labels[corrupted] + 1) % 10)
        self.assertAllClose(
            result.transition_matrix,
            splits_lib.realised_transition(result.train_clean_labels,
                                           result.train_labels, 10))
        self.assertAllEqual(result.class_counts,
                            np.bincount(result.train_labels, minlength=10))

    def test_realised_rate_on_ten_thousand_examples(self):
        labels = _labels(1100, 10)
        config = _config(noise_type="flip2", noise_rate=0.4, seed=1)
        result = splits_lib.make_splits(labels, 10, config, num_test=0)
        self.assertGreater(len(result.train_index), 10_000)
        self.assertAllClose(np.mean(result.is_corrupted), 0.4, atol=0.02)
        self.assertAllClose(result.transition_matrix.sum(axis=1),
                            np.ones(10))
        self.assertAllClose(np.diag(result.transition_matrix),
                            np.full(10, 0.6), atol=0.05)

    def test_no_noise_gives_identity(self):
        result = self._splits(noise_type="none", noise_rate=0.0)
        self.assertFalse(np.any(result.is_corrupted))
        self.assertAllEqual(result.transition_matrix, np.eye(10))

    def test_pairing_is_used(self):
        similar = np.array([[(c + 5) % 10, (c + 6) % 10] for c in range(10)])
        result = splits_lib.make_splits(self.labels, 10, self.config,
                                        similar=similar)
        corrupted = result.is_corrupted
        self.assertTrue(np.any(corrupted))
        self.assertAllEqual(
            result.train_labels[corrupted],
            similar[result.train_clean_labels[corrupted], 0])

    def test_same_seed_is_bit_identical(self):
        first, second = self._splits(), self._splits()
        for field in dataclasses.fields(splits_lib.Splits):
            a = np.asarray(getattr(first, field.name))
            b = np.asarray(getattr(second, field.name))
            self.assertEqual(a.tobytes(), b.tobytes(), field.name)
        other = self._splits(seed=8)
        self.assertNotAllEqual(first.meta_index, other.meta_index)
        self.assertNotAllEqual(first.test_index, other.test_index)

    def test_eval_sets_do_not_depend_on_tail_or_noise(self):
        first = self._splits()
        second = self._splits(imbalance_factor=50, noise_type="uniform",
                              noise_rate=0.5)
        self.assertAllEqual(first.test_index, second.test_index)
        self.assertAllEqual(first.meta_index, second.meta_index)

    def test_shipped_test_split(self):
        result = splits_lib.make_splits(self.labels, 10, self.config,
                                        has_test=True, num_test=300)
        self.assertFalse(result.test_from_train)
        self.assertAllEqual(result.test_index, np.arange(300))
        # Without a carved test set, class 0 keeps 200 - 10 meta.
        self.assertEqual(np.bincount(result.train_clean_labels)[0], 190)
        capped = splits_lib.make_splits(
            self.labels, 10, dataclasses.replace(self.config,
                                                 max_test_examples=50),
            num_test=300)
        self.assertLen(capped.test_index, 50)
        self.assertLen(np.unique(capped.test_index), 50)
        self.assertBetween(capped.test_index.max(), 0, 299)

    def test_has_test_needs_its_size(self):
        with self.assertRaisesRegex(ValueError, "has_test=True.*num_test"):
            splits_lib.make_splits(self.labels, 10, self.config,
                                   has_test=True)

    def test_save_load_round_trip(self):
        result = self._splits()
        directory = os.path.join(self.get_temp_dir(), "run")
        path = os.path.join(directory, "splits.npz")
        result.save(path)
        self.assertEqual(os.listdir(directory), ["splits.npz"])
        loaded = splits_lib.Splits.load(path)
        for field in dataclasses.fields(splits_lib.Splits):
            self.assertAllEqual(getattr(loaded, field.name),
                                getattr(result, field.name), field.name)
        self.assertIsInstance(loaded.test_from_train, bool)
        self.assertIsInstance(loaded.num_classes, int)
        self.assertIsInstance(loaded.seed, int)

    def test_load_rejects_foreign_file(self):
        path = os.path.join(self.get_temp_dir(), "other.npz")
        np.savez(path, train_index=np.arange(3))
        with self.assertRaisesRegex(ValueError, "without fields"):
            splits_lib.Splits.load(path)

    def test_meta_larger_than_a_class(self):
        with self.assertRaisesRegex(
                ValueError, "num_meta_per_class=160.*--num_meta_per_class"):
            self._splits(num_meta_per_class=160)

    def test_class_emptied_by_long_tail(self):
        # floor(150 * 1000^(-7/9)) = 0, with n_max = 150 as above. IF = 150
        # would empty class 9 too: floor(150 * 150.0**-1) is 0 in floating
        # point.
        with self.assertRaisesRegex(ValueError,
                                    "leaves class 7 empty.*=149 or lower"):
            self._splits(imbalance_factor=1000)

    def _advice(self, overrides, flag):
        """The value the error advises for `flag`."""
        with self.assertRaises(ValueError) as raised:
            self._splits(**overrides)
        match = re.search(rf"--{flag}=(\d+)", str(raised.exception))
        self.assertIsNotNone(match, str(raised.exception))
        return int(match.group(1))

    @parameterized.parameters(
        # The cap binds: n_max = 49, and floor(49 * 49.0**-1) == 0 in
        # floating point, so "IF <= n_max" (the old advice) failed again.
        (dict(max_train_per_class=49, imbalance_factor=100),
         "imbalance_factor"),
        (dict(max_train_per_class=49, imbalance_factor=100),
         "max_train_per_class"),
        # No cap: raising --max_train_per_class (the old advice) changed
        # nothing; the error no longer offers it.
        (dict(imbalance_factor=1000), "imbalance_factor"),
    )
    def test_following_the_long_tail_advice_works(self, overrides, flag):
        value = self._advice(overrides, flag)
        result = self._splits(**dict(overrides, **{flag: value}))
        counts = np.bincount(result.train_clean_labels, minlength=10)
        self.assertGreaterEqual(counts.min(), 1)

    def test_no_cap_advice_without_a_binding_cap(self):
        with self.assertRaises(ValueError) as raised:
            self._splits(imbalance_factor=1000)
        self.assertNotIn("max_train_per_class", str(raised.exception))

    def test_largest_imbalance_factor_is_exact(self):
        for n_max in (2, 49, 98, 150, 4990):
            best = splits_lib.largest_imbalance_factor(n_max, 10)
            splits_lib.long_tail_counts(n_max, 10, best)  # Does not raise.
            with self.assertRaisesRegex(ValueError, "empty"):
                splits_lib.long_tail_counts(n_max, 10, best + 1)
        self.assertEqual(splits_lib.largest_imbalance_factor(49, 10), 48)

    @parameterized.parameters(
        (np.array([0, 1, 12]), r"\[0, 12\].*expected \[0, 9\]"),
        (np.array([0, -1, 3]), r"\[-1, 3\]"),
        (np.array([0.0, 1.0]), "integer class ids"),
        (np.zeros((2, 2), np.int64), "shape"),
    )
    def test_bad_labels(self, labels, message):
        with self.assertRaisesRegex(ValueError, message):
            splits_lib.make_splits(labels, 10, self.config)


if __name__ == "__main__":
    tf.test.main()
