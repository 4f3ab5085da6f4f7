"""DARTS (Liu et al. 2019): the architecture α descends the validation loss.

Per step, in the reference order (research/nas.md §2.2): first α takes an
Adam step on L_val(w', α) with w' = w - xi grad_w L_train(w, α) (second
order; xi is the weights' current learning rate) or on L_val(w, α) (first
order), then the weights w take an SGD step on L_train(w, α) under the new α.

The second-order gradient is exact: reverse-over-reverse through the
unrolled step (nested tapes), checked against central differences of the
unrolled objective in the tests. DARTS' own central-difference Hessian-vector
product (eps = 0.01 / |v| on all weights) is not offered: on the small,
BatchNorm-heavy supernets we test it was far from the exact value (the loss
is strongly curved at that step size), and the exact product costs one extra
backward pass, which `benchmarks/search_step.py` measures.

Under tf.distribute N replicas compute what one device computes on the
global batch (`lfm_tf/distribute.py`): the virtual step's gradient is
all-reduced inside the outer tape, each replica takes the validation loss of
its own slice of the meta batch (a mean, so the replicas' shares add up to
the one-device loss), α's gradient is summed over replicas before it is
clipped and decayed, and the weight step uses the all-reduced gradient.

Under `mixed_float16` the supernet's ops compute in float16 while α, its
softmax, each edge's weighted sum and every loss stay float32
(`search_network.MixedOp`). Every gradient (the virtual step's, α's through it,
the weight step's) is taken with the loss scale as its seed and unscaled in
float32 inside the outer tape (optimization/loss_scale.py). A step with any
non-finite value changes nothing: α and its Adam state are restored, the
weights and momenta kept; the scale halves.
"""

import keras
import tensorflow as tf

from lfm_tf import distribute
from lfm_tf.methods import base
from lfm_tf.methods import learners


def entropy(probabilities):
    """Mean row entropy of softmaxed α (falls as the search commits)."""
    return -tf.reduce_mean(tf.reduce_sum(
        probabilities * tf.math.log(probabilities + 1e-12), axis=-1))


class ArchitectureStep:
    """α's optimizer: clip, coupled L2 decay, Adam (DARTS' and P-DARTS'
    settings: Adam(lr, 0.5, 0.999, eps 1e-8), decay 1e-3, P-DARTS clip 5).

    Args:
      architecture: `nas.Architecture`.
      search_config: `SearchConfig`.
    """

    def __init__(self, architecture, search_config):
        self.architecture = architecture
        self.weight_decay = float(search_config.arch_weight_decay)
        self.clip_norm = search_config.arch_grad_clip_norm
        self.optimizer = keras.optimizers.Adam(
            search_config.arch_learning_rate,
            beta_1=search_config.arch_beta_1, beta_2=0.999, epsilon=1e-8,
            name="arch_optimizer",
        )
        self.optimizer.build(self.variables)

    @property
    def variables(self):
        return [self.architecture.arch_normal, self.architecture.arch_reduce]

    def apply(self, grads):
        """One step of α.

        Args:
          grads: [normal, reduce]. Under tf.distribute, this replica's share:
            the shares of all replicas add up to the one-device gradient (as
            `distribute.scale_gradients` leaves them).
        """
        # The clip is not linear and the decay must enter once, so both act
        # on the summed gradient.
        grads = distribute.replica_sum(
            [tf.convert_to_tensor(g) for g in grads])
        if self.clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, self.clip_norm)
        # PyTorch's Adam(weight_decay) adds the decay after the clip.
        grads = [g + self.weight_decay * v
                 for g, v in zip(grads, self.variables)]
        # Keras' optimizers sum their gradients over replicas once more.
        self.optimizer.apply(distribute.scale_gradients(grads),
                             self.variables)


class Darts(base.MethodModel):
    """DARTS as a Keras model over a supernet classifier.

    Args:
      classifier: the supernet `Classifier` (trunk: `SearchNetwork`).
      sgd: `FunctionalSGD` of the weights w.
      num_classes: C.
      architecture: `nas.Architecture` (α).
      search_config: `SearchConfig` (order, α optimizer).
      hypergradient: `exact` (the only one offered; see the module doc).
    """

    METRIC_NAMES = ("loss", "val_loss", "arch_entropy")

    def __init__(self, classifier, sgd, num_classes, *, architecture,
                 search_config, hypergradient="exact", **kwargs):
        super().__init__(classifier, sgd, num_classes, **kwargs)
        self.architecture = architecture
        self.arch_step = ArchitectureStep(architecture, search_config)
        self.second_order = search_config.arch_order == "second"
        if hypergradient != "exact":
            raise ValueError(
                f"Received hypergradient={hypergradient!r} for DARTS; "
                "expected `exact` (set --arch_order=first for the "
                "first-order gradient)."
            )
        self.learner = learners.Learner(classifier.trunk, classifier.head,
                                        architecture)
        # Python switch (P-DARTS' weight-only warm-up epochs); the search
        # pipeline resets the train function when it flips.
        self.arch_updates = True

    def call(self, images, training=False):
        return self.learner(images, training=training)

    def train_step(self, data):
        train, meta = data["train"], data["meta"]
        arch_state = (self.arch_state_variables()
                      if self.loss_scale.enabled else [])
        before = self.loss_scale.snapshot(arch_state)
        finite = tf.constant(True)
        if self.arch_updates:
            val_loss, arch_grads = self.architecture_gradient(train, meta)
            self.arch_step.apply(arch_grads)
            # α after its step rather than its gradient: the gradient is
            # this replica's share, α is the same on every replica, so all
            # replicas agree (a non-finite gradient makes α NaN via Adam).
            finite = self.loss_scale.finite(self.arch_step.variables)
        else:
            val_loss = tf.constant(0.0)
        loss, logits, finite = self.weight_step(train, finite)
        self.loss_scale.restore_unless(finite, arch_state, before)
        normal, reduce = self.architecture.probabilities()
        return self.finish_step(
            train["label"], logits, finite=finite, loss=loss,
            val_loss=val_loss,
            arch_entropy=(entropy(normal) + entropy(reduce)) / 2.0)

    def arch_state_variables(self):
        """What α's step writes: α, its Adam moments and iteration count
        (restored when the step turns out non-finite)."""
        return self.arch_step.variables + list(
            self.arch_step.optimizer.variables)

    def weight_step(self, train, finite=True):
        """w <- SGD step on L_train(w, α).

        Args:
          train: the training batch.
          finite: bool scalar, whether α's step was finite; under loss
            scaling w is only stepped if it and this step's values are.

        Returns:
          (loss, logits float [B, C], bool scalar: whether the whole step
          is finite).
        """
        params = self.learner.current()
        with tf.GradientTape() as tape:
            tape.watch(params)
            losses, out = self.learner.losses(params, train["image"],
                                              train["label"])
            loss = tf.reduce_mean(losses)
        new_params, new_momenta = self.sgd.unroll(
            params, distribute.replica_mean(
                self.loss_scale.gradient(tape, loss, params)),
            self.step_counter)
        finite = tf.logical_and(
            finite, self.loss_scale.finite(new_params + new_momenta))
        self.sgd.assign(
            self.learner.variables,
            self.loss_scale.select(finite, new_params, params),
            self.loss_scale.select(finite, new_momenta, self.sgd.momenta))
        self.learner.assign_states(out.states)
        return loss, out.logits, finite

    def train_loss(self, params, train):
        losses, _ = self.learner.losses(params, train["image"],
                                        train["label"])
        return tf.reduce_mean(losses)

    def virtual_step(self, params, train):
        """w' = one SGD step (momentum, decay) from `params`; differentiable.

        The gradient is all-reduced here, inside the caller's tape, so every
        replica steps to the one-device w' and α's gradient reaches every
        replica's training examples.
        """
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = self.train_loss(params, train)
        # Scaled and unscaled inside the outer tape: w' is unchanged and
        # α's second-order path flows (loss_scale.py).
        grads = distribute.replica_mean(
            self.loss_scale.gradient(tape, loss, params))
        return self.sgd.unroll(params, grads, self.step_counter)[0]

    def architecture_gradient(self, train, meta):
        """(L_val, dL_val/dα as [normal, reduce]).

        Under tf.distribute, L_val is the loss of this replica's meta slice
        and the gradient is this replica's share (summed over replicas: the
        one-device gradient, as `ArchitectureStep.apply` takes it).
        """
        arch = self.arch_step.variables
        params = self.learner.current()
        with tf.GradientTape() as tape:
            if self.second_order:
                params = self.virtual_step(params, train)
            val_loss = self.train_loss(params, meta)
        # Each replica's L_val is the mean of its slice, and the gradient
        # through the all-reduced w' adds every replica's upstream gradient:
        # the shares sum to N times the one-device gradient of the mean.
        return val_loss, distribute.scale_gradients(
            self.loss_scale.gradient(tape, val_loss, arch))
