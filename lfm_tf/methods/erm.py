"""Loss-only baselines: ERM, focal loss and the class-balanced loss."""

import tensorflow as tf

from lfm_tf.methods import base
from lfm_tf.methods import losses as losses_lib


class ERM(base.MethodModel):
    """Empirical risk minimisation: mean l_i on the (noisy) training batch.

    l_i is the run's training loss (`--loss`, CE by default). The meta batch
    is ignored; it is in the element only so that every method consumes the
    same data.
    """

    def example_losses(self, labels, logits, losses):
        """Per-example objective from l_i float [B]; subclasses reweight it."""
        del labels, logits
        return losses

    def train_step(self, data):
        train = data["train"]
        with tf.GradientTape() as tape:
            losses, logits = self.learner_losses(
                train["image"], train["label"])
            loss = tf.reduce_mean(
                self.example_losses(train["label"], logits, losses)
            )
        finite = self.sgd_update(
            self.sgd, self.learner_variables(), loss, tape
        )
        return self.finish_step(train["label"], logits, finite=finite,
                                loss=loss)


class Focal(ERM):
    """Focal loss (Lin et al. 2017): ERM whose training loss is
    `methods.losses.focal_loss` (the factory builds it; same as `--method=erm
    --loss=focal`)."""


class ClassBalanced(ERM):
    """Class-balanced loss, effective-number weights (Cui et al. 2019):
    w_y * l_i, with l_i the run's training loss (CE by default).

    Args:
      class_counts: int [C] training examples per observed class.
      beta: effective-number parameter.
      **kwargs: `MethodModel` arguments.
    """

    def __init__(self, *args, class_counts, beta=0.9999, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = tf.constant(
            losses_lib.class_balanced_weights(class_counts, beta)
        )

    def example_losses(self, labels, logits, losses):
        del logits
        weights = tf.gather(self.class_weights, tf.cast(labels, tf.int32))
        return tf.cast(weights, losses.dtype) * losses
