"""Deep Bilevel Learning (Jenni & Favaro 2018): mini-batch learning rates.

The training batch is cut into S mini-batches ("splits"). Each split i gets a
weight from how well its gradient agrees with a validation gradient,

    omega_i = <g_val, g_i> / (|g_i|^2 + mu),   omega~ = omega / sum_k |omega_k|

and the step follows sum_i omega~_i g_i. Negative weights are kept (that
split's gradient is ascended). As in the authors' code, the validation
gradient is split 0 of the (noisy) training batch itself, so no clean data
is needed; `dbl_validation=meta` uses the clean meta batch instead and trains
on all S splits. BatchNorm statistics are per split, as in the reference
(research/seed_systems.md §4.2).
"""

import tensorflow as tf

from lfm_tf import distribute
from lfm_tf.methods import base
from lfm_tf.methods import learners


def dbl_weights(validation_grad, split_grads, mu):
    """omega~_i for flattened gradients.

    Args:
      validation_grad: float [P], g_val.
      split_grads: float [S, P], one gradient per training split.
      mu: the denominator's offset.

    Returns:
      float [S]; sum of absolute values 1 (all zero if every omega is 0).
    """
    agreement = tf.linalg.matvec(split_grads, validation_grad)
    omega = agreement / (tf.reduce_sum(tf.square(split_grads), axis=1) + mu)
    total = tf.reduce_sum(tf.abs(omega))
    return omega / tf.where(total > 0, total, tf.ones_like(total))


def _flatten(grads):
    return tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)


class DeepBilevel(base.MethodModel):
    """Deep Bilevel Learning as a Keras model.

    Args:
      splits: S, mini-batches per training batch.
      mu: omega's denominator offset.
      validation: `train_split` or `meta`.
      **kwargs: `MethodModel` arguments.
    """

    METRIC_NAMES = ("loss", "val_loss", "omega_min", "omega_max",
                    "negative_fraction")

    def __init__(self, *args, splits=4, mu=0.01, validation="train_split",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.splits = int(splits)
        self.mu = float(mu)
        self.validation = validation
        self.learner = learners.Learner(self.classifier.trunk,
                                        self.classifier.head)

    def split_gradient(self, params, images, labels):
        """(mean CE of the split, its gradient list, BN states)."""
        with tf.GradientTape() as tape:
            tape.watch(params)
            losses, out = self.learner.losses(params, images, labels)
            loss = tf.reduce_mean(losses)
        return loss, tape.gradient(loss, params), out

    def train_step(self, data):
        train, meta = data["train"], data["meta"]
        params = self.learner.current()
        images = tf.split(train["image"], self.splits)
        labels = tf.split(train["label"], self.splits)
        results = [self.split_gradient(params, x, y)
                   for x, y in zip(images, labels)]
        if self.validation == "meta":
            val_loss, val_grads, _ = self.split_gradient(
                params, meta["image"], meta["label"])
        else:
            (val_loss, val_grads, _), results = results[0], results[1:]
        split_grads = [[tf.zeros_like(p) if g is None else g
                        for p, g in zip(params, r[1])] for r in results]
        omega = dbl_weights(
            _flatten([tf.zeros_like(p) if g is None else g
                      for p, g in zip(params, val_grads)]),
            tf.stack([_flatten(g) for g in split_grads]), self.mu)
        direction = [
            tf.add_n([w * g[i] for w, g in zip(tf.unstack(omega),
                                                split_grads)])
            for i in range(len(params))
        ]
        # Per-replica splits (README: DBL under tf.distribute); the mean
        # keeps the replicas' weights equal.
        new_params, new_momenta = self.sgd.unroll(
            params, distribute.replica_mean(direction), self.step_counter)
        self.sgd.assign(self.learner.variables, new_params, new_momenta)
        # One moving-average update per step, from the last split.
        self.learner.assign_states(results[-1][2].states)
        loss = tf.add_n([r[0] for r in results]) / len(results)
        logits = tf.concat([r[2].logits for r in results], axis=0)
        trained_labels = tf.concat(
            [y for y in labels[len(labels) - len(results):]], axis=0)
        return self.finish_step(
            trained_labels, logits, loss=loss, val_loss=val_loss,
            omega_min=tf.reduce_min(omega), omega_max=tf.reduce_max(omega),
            negative_fraction=tf.reduce_mean(
                tf.cast(omega < 0, omega.dtype)),
        )

