"""Loss-only baselines: ERM, focal loss and the class-balanced loss."""

import tensorflow as tf

from lfm_tf.methods import base
from lfm_tf.methods import losses


class ERM(base.MethodModel):
    """Empirical risk minimisation: mean CE on the (noisy) training batch.

    The meta batch is ignored; it is in the element only so that every
    method consumes the same data.
    """

    def example_losses(self, labels, logits, ce):
        """Per-example training loss, float [B]; subclasses reshape it."""
        del labels, logits
        return ce

    def train_step(self, data):
        train = data["train"]
        with tf.GradientTape() as tape:
            ce, logits = self.learner_losses(train["image"], train["label"])
            loss = tf.reduce_mean(
                self.example_losses(train["label"], logits, ce)
            )
        finite = self.sgd_update(
            self.sgd, self.learner_variables(), loss, tape
        )
        return self.finish_step(train["label"], logits, finite=finite,
                                loss=loss)


class Focal(ERM):
    """Focal loss (Lin et al. 2017).

    Args:
      gamma: focusing parameter.
      **kwargs: `MethodModel` arguments.
    """

    def __init__(self, *args, gamma=2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma = float(gamma)

    def example_losses(self, labels, logits, ce):
        del ce
        return losses.focal_loss(labels, logits, self.gamma)


class ClassBalanced(ERM):
    """Class-balanced CE with effective-number weights (Cui et al. 2019).

    Args:
      class_counts: int [C] training examples per observed class.
      beta: effective-number parameter.
      **kwargs: `MethodModel` arguments.
    """

    def __init__(self, *args, class_counts, beta=0.9999, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = tf.constant(
            losses.class_balanced_weights(class_counts, beta)
        )

    def example_losses(self, labels, logits, ce):
        del logits
        weights = tf.gather(self.class_weights, tf.cast(labels, tf.int32))
        return tf.cast(weights, ce.dtype) * ce
