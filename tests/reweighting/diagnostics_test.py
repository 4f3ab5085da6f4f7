"""The meta level's diagnostics: cosine, head/tail masks, LatestValue."""

import numpy as np
import tensorflow as tf

from lfm_tf.reweighting import diagnostics


class CosineTest(tf.test.TestCase):

    def test_matches_numpy_and_ignores_shape(self):
        rng = np.random.default_rng(0)
        u, v = rng.normal(size=(2, 3, 4))
        expected = np.sum(u * v) / (np.linalg.norm(u) * np.linalg.norm(v))
        self.assertAllClose(diagnostics.cosine_similarity(u, v), expected)
        self.assertAllClose(diagnostics.cosine_similarity(u, -2 * u), -1.0)

    def test_zero_vector_has_no_direction(self):
        self.assertEqual(
            float(diagnostics.cosine_similarity(np.zeros(3), np.ones(3))),
            0.0)


class TailMaskTest(tf.test.TestCase):

    def test_below_the_median_is_tail(self):
        self.assertAllEqual(diagnostics.tail_class_mask([10, 5, 20, 1]),
                            [False, True, False, True])
        # Odd C: the median class itself is head.
        self.assertAllEqual(diagnostics.tail_class_mask([3, 9, 6]),
                            [True, False, False])

    def test_balanced_data_has_no_tail(self):
        self.assertFalse(np.any(diagnostics.tail_class_mask([7, 7, 7])))

    def test_rejects_a_non_vector(self):
        with self.assertRaisesRegex(ValueError, r"shape \[C\]"):
            diagnostics.tail_class_mask([[1, 2]])

    def test_membership_gathers_by_label(self):
        self.assertAllEqual(
            diagnostics.class_membership([2, 0, 1, 1], [False, True, True]),
            [1.0, 0.0, 1.0, 1.0])


class LatestValueTest(tf.test.TestCase):

    def test_holds_the_last_weighted_value_across_resets(self):
        metric = diagnostics.LatestValue("alignment")
        self.assertEqual(float(metric.result()), 0.0)
        metric.update_state(-0.5, 1.0)
        metric.update_state(0.9, 0.0)
        self.assertAllClose(metric.result(), -0.5)
        metric.reset_state()
        self.assertAllClose(metric.result(), -0.5)
        metric.update_state(0.25, 1.0)
        self.assertAllClose(metric.result(), 0.25)


if __name__ == "__main__":
    tf.test.main()
