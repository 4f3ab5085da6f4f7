"""The DARTS pooling op, checked where TF's own kernel goes wrong."""

import keras
import numpy as np
import tensorflow as tf

from lfm_tf.nas import operations


def _argmax_gather(x, g):
    """g at each 3x3 window's argmax of x ('same' size, stride 1), in numpy:
    the second derivative of a max pool (MaxPoolGradGrad)."""
    batch, height, width, channels = x.shape
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)],
                    constant_values=-np.inf)
    out = np.zeros_like(g)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                for c in range(channels):
                    window = padded[b, i:i + 3, j:j + 3, c]
                    di, dj = np.unravel_index(np.argmax(window), (3, 3))
                    out[b, i, j, c] = g[b, i + di - 1, j + dj - 1, c]
    return out


def _second_order(pool, x, g):
    """d/dv <dpool(x)/dx^T (2v), 2g> at v = g, traced: what an unrolled
    step's hypergradient takes through a max pool; every upstream tensor is
    fresh, so TF may reuse its buffer."""

    @tf.function
    def run(x, v):
        with tf.GradientTape() as outer:
            outer.watch(v)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = pool(x)
            dx = inner.gradient(y, x, output_gradients=v * 2.0)
            s = tf.reduce_sum(dx * (g * 2.0))
        return outer.gradient(s, v)

    return run(x, g).numpy()


class MaxPoolTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(4, 8, 8, 4)).astype(np.float32)
        self.g = rng.normal(size=(4, 8, 8, 4)).astype(np.float32)

    def test_values_are_same_padding_max_pool(self):
        expected = keras.layers.MaxPooling2D(3, strides=1,
                                             padding="same")(self.x)
        self.assertAllEqual(operations.max_pool_3x3(self.x), expected)

    def test_float16_values(self):
        x = self.x.astype(np.float16)
        expected = keras.layers.MaxPooling2D(
            3, strides=1, padding="same", dtype="float16")(x)
        self.assertAllEqual(operations.max_pool_3x3(x), expected)

    def test_second_derivative_in_a_graph_is_exact(self):
        # Keras' MaxPooling2D(padding="same") gave errors up to O(1) here
        # on TF 2.21's CPU (its MaxPoolGradGrad reuses the upstream buffer).
        expected = 4.0 * _argmax_gather(self.x, self.g)
        pool = operations.Pool("max", stride=1)
        actual = _second_order(lambda x: pool(x), tf.constant(self.x),
                               tf.constant(self.g))
        self.assertAllClose(actual, expected, atol=1e-5)

    def test_stride_two_subsamples_the_stride_one_pool(self):
        pool = operations.Pool("max", stride=2)
        self.assertAllEqual(pool(self.x),
                            operations.max_pool_3x3(self.x)[:, ::2, ::2, :])


if __name__ == "__main__":
    tf.test.main()
