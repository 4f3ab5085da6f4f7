"""x, z, u -> a: shapes, ranges and hand-computed values."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf.reweighting import example_weights
from lfm_tf.reweighting import mistake_weighting as mw


class SimilarityTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.train = rng.normal(size=(5, 3)).astype(np.float32)
        self.val = rng.normal(size=(4, 3)).astype(np.float32)

    @parameterized.parameters("dot", "cosine", "l2")
    def test_rows_are_distributions(self, metric):
        x = mw.similarity(self.train, self.val, metric)
        self.assertEqual(x.shape, (5, 4))
        self.assertAllClose(tf.reduce_sum(x, 1), np.ones(5))
        self.assertAllGreaterEqual(x, 0.0)

    def test_dot_by_hand(self):
        scores = self.train @ self.val.T
        expected = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
        self.assertAllClose(mw.similarity(self.train, self.val, "dot"),
                            expected, rtol=1e-5)

    def test_cosine_ignores_scale(self):
        a = mw.similarity(self.train, self.val, "cosine")
        b = mw.similarity(10 * self.train, 0.1 * self.val, "cosine")
        self.assertAllClose(a, b, rtol=1e-5)

    def test_l2_prefers_nearest(self):
        val = np.array([[0.0, 0.0], [5.0, 5.0]], np.float32)
        train = np.array([[0.1, 0.0], [4.9, 5.2]], np.float32)
        x = mw.similarity(train, val, "l2").numpy()
        self.assertGreater(x[0, 0], 0.99)
        self.assertGreater(x[1, 1], 0.99)

    def test_unknown_metric(self):
        with self.assertRaisesRegex(ValueError, "similarity metric 'manhattan'"):
            mw.similarity(self.train, self.val, "manhattan")


class WeightsTest(tf.test.TestCase):

    def test_same_label_mask(self):
        z = mw.same_label_mask(tf.constant([0, 1, 1]), tf.constant([1, 0]))
        self.assertAllEqual(z, [[0, 1], [1, 0], [1, 0]])

    def test_a_by_hand(self):
        x = np.array([[0.7, 0.3], [0.2, 0.8]], np.float32)
        z = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
        u = np.array([2.0, 0.5], np.float32)
        r = np.array([1.0, -1.0], np.float32)
        a = mw.example_weights_a(x, z, u, r)
        logits = np.array([0.7 * 2.0, 0.2 * 2.0 - 0.8 * 0.5])
        self.assertAllClose(a, 1 / (1 + np.exp(-logits)))

    def test_a_in_half_to_one_when_r_is_one(self):
        rng = np.random.default_rng(1)
        x = mw.similarity(rng.normal(size=(6, 3)), rng.normal(size=(5, 3)))
        z = mw.same_label_mask(rng.integers(0, 3, 6), rng.integers(0, 3, 5),
                               x.dtype)
        u = tf.constant(rng.uniform(0, 3, 5))
        a = mw.example_weights_a(x, z, u, tf.ones(5, x.dtype))
        self.assertEqual(a.shape, (6,))
        self.assertAllGreaterEqual(a, 0.5)
        self.assertAllLess(a, 1.0)

    def test_no_same_label_example_gives_half(self):
        a = mw.example_weights_a(
            tf.constant([[1.0]]), tf.constant([[0.0]]), tf.constant([3.0]),
            tf.constant([1.0]))
        self.assertAllClose(a, [0.5])

    def test_ablations_replace_factor_by_ones(self):
        x = tf.constant([[0.25, 0.75]])
        z = tf.constant([[1.0, 0.0]])
        u = tf.constant([2.0, 4.0])
        r = tf.ones(2)
        no_x = mw.example_weights_a(x, z, u, r, use_similarity=False)
        self.assertAllClose(no_x, tf.sigmoid([2.0]))
        no_z = mw.example_weights_a(x, z, u, r, use_label_mask=False)
        self.assertAllClose(no_z, tf.sigmoid([0.5 + 3.0]))
        no_u = mw.example_weights_a(x, z, u, r, use_mistakes=False)
        self.assertAllClose(no_u, tf.sigmoid([0.25]))

    def test_temperature_divides_the_argument(self):
        x = tf.constant([[0.25, 0.75]])
        z = tf.constant([[1.0, 1.0]])
        u = tf.constant([2.0, 4.0])
        r = tf.constant([1.0, -0.5])
        # s = 0.25*2*1 + 0.75*4*(-0.5) = -1.
        self.assertAllClose(mw.example_weights_a(x, z, u, r),
                            tf.sigmoid([-1.0]))
        self.assertAllClose(mw.example_weights_a(x, z, u, r, temperature=0.25),
                            tf.sigmoid([-4.0]))

    def test_centering_subtracts_the_batch_mean(self):
        x = tf.constant([[1.0], [0.5], [0.0]])
        z = tf.ones([3, 1])
        u = tf.constant([2.0])
        r = tf.ones(1)
        # s = [2, 1, 0], mean 1.
        self.assertAllClose(
            mw.example_weights_a(x, z, u, r, centered=True, temperature=0.5),
            tf.sigmoid([2.0, 0.0, -2.0]))

    def test_class_mean_losses(self):
        u = tf.constant([1.0, 3.0, 0.5, 2.0])
        labels = tf.constant([2, 2, 0, 2])
        self.assertAllClose(mw.class_mean_losses(u, labels, 3),
                            [2.0, 2.0, 0.5, 2.0])

    def test_per_example_cross_entropy(self):
        logits = tf.constant([[0.0, 0.0], [2.0, 0.0]])
        ce = mw.per_example_cross_entropy(tf.constant([0, 1]), logits)
        self.assertAllClose(ce, [np.log(2), np.log(1 + np.exp(2))])


class WeightTableTest(tf.test.TestCase):

    def test_gather_and_projection(self):
        table = example_weights.WeightTable(4, 1.0, non_negative=True)
        self.assertAllClose(table.gather(tf.constant([3, 1])), [1.0, 1.0])
        table.values.assign([-1.0, 0.5, 2.0, -0.1])
        table.project()
        self.assertAllClose(table.values, [0.0, 0.5, 2.0, 0.0])

    def test_bad_size(self):
        with self.assertRaisesRegex(ValueError, "size of 0"):
            example_weights.WeightTable(0)


if __name__ == "__main__":
    tf.test.main()
