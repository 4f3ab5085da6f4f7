"""Diagnostics of the meta level: does B's update help the learner it weights?

Pure functions (no model state), used by LFM-DR's train step:

- `cosine_similarity`: the alignment of two gradients, e.g. B's
  hypergradient with grad_B L_val(W1'). Negative means a step along one
  ascends the other: B's update then makes W1 worse on validation.
- `tail_class_mask` / `class_membership`: which examples belong to the
  tail classes (training count below the median), so weights can be
  compared head vs tail as they are clean vs corrupted.
- `LatestValue`: a metric for a diagnostic computed only every N steps.
"""

import keras
import numpy as np
import tensorflow as tf


def cosine_similarity(u, v):
    """cos(u, v) of two tensors of one shape, flattened; 0 if either is 0.

    Args:
      u: float tensor, any shape.
      v: float tensor, the shape of `u`.

    Returns:
      float scalar in [-1, 1] (0 where a norm is zero: no direction).
    """
    u = tf.reshape(u, [-1])
    v = tf.reshape(tf.cast(v, u.dtype), [-1])
    norms = tf.norm(u) * tf.norm(v)
    return tf.math.divide_no_nan(tf.reduce_sum(u * v), norms)


def tail_class_mask(class_counts):
    """Tail classes: training count strictly below the median count.

    On balanced data (all counts equal) no class is tail. Classes absent
    from the training set (count 0) are tail whenever the median is above 0.

    Args:
      class_counts: int [C], training examples per (observed) class.

    Returns:
      bool [C].
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(
            f"Received class_counts of shape {counts.shape}; expected one "
            "count per class, shape [C] with C >= 1 (DataFacts.class_counts)."
        )
    return counts < np.median(counts)


def class_membership(labels, class_mask, dtype=tf.float32):
    """1.0 where an example's label is in `class_mask`, else 0.0.

    Args:
      labels: int [B].
      class_mask: bool or float [C].
      dtype: of the result.

    Returns:
      `dtype` [B].
    """
    return tf.gather(tf.cast(class_mask, dtype), labels)


class LatestValue(keras.metrics.Metric):
    """The latest value recorded with a positive weight, held until the next.

    For a diagnostic computed every N steps: between computations (and
    across Keras' per-epoch metric resets, which leave it) it reports the
    last computed value rather than 0 or NaN; before the first, 0.

    Args:
      name: metric name.
    """

    def __init__(self, name, **kwargs):
        super().__init__(name=name, **kwargs)
        self.value = self.add_variable(shape=(), initializer="zeros",
                                       name="value")

    def update_state(self, value, sample_weight=1.0):
        """Records `value` (float scalar) where `sample_weight` > 0."""
        value = tf.cast(value, self.value.dtype)
        weight = tf.cast(sample_weight, self.value.dtype)
        self.value.assign(tf.where(weight > 0, value, self.value))

    def result(self):
        return tf.identity(self.value)

    def reset_state(self):
        # Deliberately kept: an epoch without a computation shows the last.
        pass
