"""What every method shares: the evaluated classifier, metrics, evaluation.

A method is a `keras.Model` whose `train_step` consumes the zipped element
`{"train": {...}, "meta": {...}}` of `lfm_tf.data.pipeline` and whose
`test_step` consumes `(image, label)` batches. `call` is the classifier that
is evaluated, selected on validation and exported.
"""

import keras
import tensorflow as tf

from lfm_tf import distribute
from lfm_tf.methods import learners
from lfm_tf.methods import losses as losses_lib
from lfm_tf.optimization import loss_scale as loss_scale_lib
from lfm_tf.optimization import unroll
from lfm_tf.reweighting import mistake_weighting


class MethodModel(keras.Model):
    """Base class: a learner W1 trained by functional SGD, plus metrics.

    Args:
      classifier: the learner W1, images float [B,H,W,3] -> logits [B,C].
      sgd: `FunctionalSGD` stepping W1.
      num_classes: C.
      training_loss: `losses.TrainingLoss`, the per-example loss of every
        learner step (None: CE).
    """

    # Names of the `keras.metrics.Mean` trackers a subclass reports; created
    # in __init__ because metric variables cannot be created while tracing.
    METRIC_NAMES = ("loss",)

    def __init__(self, classifier, sgd, num_classes, training_loss=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.classifier = classifier
        self.training_loss = training_loss or losses_lib.TrainingLoss()
        self.sgd = sgd
        self.num_classes = int(num_classes)
        self.sgd.build_slots(self.learner_variables())
        # Built under the run's dtype policy (train_lib): float16 compute
        # needs dynamic loss scaling, every other policy none.
        self.loss_scale = loss_scale_lib.DynamicLossScale(
            loss_scale_lib.float16_policy(keras.config.dtype_policy()),
            name="loss_scale")
        self.step_counter = self.add_weight(
            shape=(), initializer="zeros", dtype="int64", trainable=False,
            name="step_counter",
        )
        self._trackers = {
            name: keras.metrics.Mean(name=name) for name in self.METRIC_NAMES
        }
        self.loss_tracker = self._trackers["loss"]
        # Every part is built on construction; Keras need not build again.
        self.built = True
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(
            name="accuracy"
        )

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' TF trainer, under any tf.distribute strategy, draws a batch
        # to build the model symbolically, then restarts the iterator: an
        # extra pass of the seeded stream (resume would see other batches),
        # and with MultiWorkerMirroredStrategy it fails on nested batches.
        # Every method is built on construction, so there is nothing to do.
        del iterator, data_batch

    def learner_variables(self):
        """W1's trainable variables, in the order the SGD slots follow
        (trunk then head, as `learners.Learner` lists them)."""
        return learners.Learner(
            self.classifier.trunk, self.classifier.head
        ).variables

    @property
    def metrics(self):
        return list(self._trackers.values()) + [self.accuracy_tracker]

    def call(self, images, training=False):
        return self.classifier(images, training=training)

    def train_loss(self, labels, logits):
        """The per-example training loss l_i at the current step, float [B]
        (DRW reads the step counter)."""
        return self.training_loss(labels, logits, self.step_counter)

    def learner_losses(self, images, labels, training=True):
        """Per-example training loss of W1 (called normally, so BN
        statistics update).

        A derived NAS network with an auxiliary head adds its weighted loss
        in training (DARTS' evaluation protocol).

        Returns:
          (losses float [B], logits float [B, C]).
        """
        auxiliary_weight = getattr(self.classifier, "auxiliary_weight", 0.0)
        if training and auxiliary_weight:
            logits, auxiliary = self.classifier.logits_and_auxiliary(
                images, training=True)
            losses = self.train_loss(labels, logits) + auxiliary_weight * (
                self.train_loss(labels, auxiliary))
            return losses, logits
        logits = self.classifier(images, training=training)
        return self.train_loss(labels, logits), logits

    def sgd_update(self, sgd, variables, loss, tape):
        """Applies one functional SGD step on `variables` from `loss`.

        Under loss scaling the step is skipped (W and momenta kept) when any
        value it would write is non-finite.

        Returns:
          bool scalar: whether the step was finite (and applied).
        """
        grads = distribute.replica_mean(
            self.loss_scale.gradient(tape, loss, variables))
        new_params, new_momenta = sgd.unroll(
            variables, grads, self.step_counter
        )
        finite = self.loss_scale.finite(new_params + new_momenta)
        sgd.assign(
            variables,
            self.loss_scale.select(finite, new_params, variables),
            self.loss_scale.select(finite, new_momenta, sgd.momenta),
        )
        return finite

    def state_variables(self):
        """Variables forward passes update (BatchNorm moving statistics)."""
        return list(self.classifier.non_trainable_variables)

    def finish_step(self, labels, logits, finite=None, **values):
        """Advances the step counter and reports `values` as metrics.

        Args:
          labels: int [B].
          logits: float [B, C].
          finite: bool scalar, whether the step's updates were finite (and
            applied); moves the loss scale. None: the scale is left alone
            (disabled, or the method moves it itself, as LFM-DR does).
          **values: scalar metrics by tracker name.

        Returns:
          The step logs, with `loss_scale` under loss scaling.
        """
        # Each replica updated the moving statistics from its own slice;
        # averaging keeps the mirrored copies equal (README, BatchNorm).
        distribute.assign_replica_mean(self.state_variables())
        if finite is not None:
            # Last: every gradient of this step was taken with the old S.
            self.loss_scale.update(finite)
        # The step counter (the learning-rate schedule) advances on a skipped
        # step too: its batch is consumed either way.
        self.step_counter.assign_add(1)
        self.accuracy_tracker.update_state(labels, logits)
        for name, value in values.items():
            self._trackers[name].update_state(value)
        logs = {m.name: m.result() for m in self.metrics}
        logs.update(self.loss_scale.logs())
        return distribute.step_logs(logs)

    def test_step(self, data):
        images, labels = data
        logits = self(images, training=False)
        loss = tf.reduce_mean(
            mistake_weighting.per_example_cross_entropy(labels, logits)
        )
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(labels, logits)
        return distribute.step_logs({
            "loss": self.loss_tracker.result(),
            "accuracy": self.accuracy_tracker.result(),
        })

    def predict_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        return self(images, training=False)


def make_sgd(optimizer_config, learning_rate, total_steps, warmup_steps=0,
             name=None):
    """A `FunctionalSGD` with the shared momentum/decay/clip settings."""
    return unroll.FunctionalSGD(
        learning_rate=learning_rate,
        momentum=optimizer_config.momentum,
        weight_decay=optimizer_config.weight_decay,
        clip_norm=optimizer_config.grad_clip_norm,
        schedule=optimizer_config.lr_schedule,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        name=name,
    )
