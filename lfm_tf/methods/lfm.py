"""LFM data reweighting (LFM-DR): the three-stage update (DESIGN §1).

Per step, with a training batch (x, y, idx) and a clean meta batch:

1. learn:    W1' = W1 - eta1 * grad mean_i(b_idx_i * l_i(W1))
2. relearn:  u = CE(W1'; meta), x = softmax(sim(V(x), V(x_val))), z = same
             label, a = sigmoid((x*z*u) r); W2' = W2 - eta2 * grad mean(a * l(W2))
3. validate: B, V, r descend L_val(W2'), through both unrolled steps.

`--lfm_objective` varies the weight path and stage 3 (README, "LFM
objectives"): `shared` weights W2's step by b_i a_i / mean(b a) instead of
a_i; `both` descends L_val(W1') + L_val(W2'). `--mistake_weighting=none`
sets a = 1. Every step also logs the diagnostics of `diagnose`.

W1' and W2' are then assigned as the real updates (same formula, computed
once). Unlike the authors' code (lfm_reference §2.6) B is one weight per
training example, r one per meta example, B's gradient really flows through
stage 2, and models are selected on validation only.
"""

from typing import List, NamedTuple, Optional

import keras
import tensorflow as tf
from absl import logging

from lfm_tf import distribute
from lfm_tf.methods import base
from lfm_tf.methods import learners
from lfm_tf.optimization import hypergradients
from lfm_tf.optimization import unroll
from lfm_tf.reweighting import diagnostics
from lfm_tf.reweighting import example_weights
from lfm_tf.reweighting import mistake_weighting


class Step(NamedTuple):
    """An unrolled learner step: W', m', BN statistics, its loss, the
    features and logits of the forward pass it started from, and the
    (replica-mean, unclipped) gradient g it took."""

    params: List[tf.Tensor]
    momenta: List[tf.Tensor]
    states: List[tf.Tensor]
    loss: tf.Tensor
    logits: tf.Tensor
    features: tf.Tensor
    grads: Optional[List[tf.Tensor]] = None


class LFM(base.MethodModel):
    """LFM-DR as a Keras model.

    Args:
      classifier: W1, a `Classifier` (trunk + head); the evaluated learner
        unless `config.evaluate_learner == "w2"`.
      sgd: `FunctionalSGD` of W1.
      num_classes: C.
      w2_trunk: W2's trunk; W1's trunk object under PS (`encoder=shared`).
      w2_head: W2's head.
      w2_sgd: `FunctionalSGD` of W2.
      encoder: V, images -> embeddings; None under PS (V = W1's trunk).
      num_train: length of B: the training set size, or the number of
        classes under `example_weight_granularity=class`.
      num_weighting: length of r (meta set size, or meta batch size when
        positional).
      config: `MethodConfig`.
      optimizer_config: `OptimizerConfig` (learning rates of B, V and r).
    """

    METRIC_NAMES = (
        "loss", "w1_loss", "w2_loss", "val_loss",
        "a_mean", "a_min", "a_max", "b_mean", "b_min", "b_max",
        "a_clean", "a_corrupted", "b_clean", "b_corrupted",
        "w1_clip_fraction", "w2_clip_fraction",
        # Diagnostics of the meta level (README, "LFM diagnostics").
        "b_grad_norm", "b_alignment", "a_head", "a_tail", "b_head", "b_tail",
    )

    def __init__(
        self, classifier, sgd, num_classes, *, w2_trunk, w2_head, w2_sgd,
        encoder, num_train, num_weighting, config, optimizer_config,
        class_counts=None, **kwargs,
    ):
        super().__init__(classifier, sgd, num_classes, **kwargs)
        self.config = config
        # Computed every `diagnostics_every` steps; holds its last value.
        self._trackers["b_alignment"] = diagnostics.LatestValue(
            name="b_alignment")
        # Tail classes (count below the median) for the head/tail weights;
        # without counts every class is head.
        self.tail_classes = tf.constant(
            diagnostics.tail_class_mask(class_counts)
            if class_counts is not None else [False] * self.num_classes)
        self.w2_trunk = w2_trunk
        self.w2_head = w2_head
        self.w2_sgd = w2_sgd
        self.encoder = encoder
        # Both learners' steps descend the run's training loss (`--loss`);
        # u and L_val on the meta batch stay CE (`Learner.losses`).
        self.w1 = learners.Learner(classifier.trunk, classifier.head,
                                   training_loss=self.train_loss)
        self.w2 = learners.Learner(w2_trunk, w2_head,
                                   training_loss=self.train_loss)
        self.w2_sgd.build_slots(self.w2.variables)
        self.example_weight_table = example_weights.WeightTable(
            num_train, 1.0, non_negative=True, name="example_weight_table"
        )
        self.weighting_table = example_weights.WeightTable(
            num_weighting, config.weighting_init, name="weighting_table"
        )
        # Clipped in `apply_weighting_step`, on the gradient summed over
        # replicas (Keras' `global_clipnorm` would clip each replica's share).
        self.clip_norm = optimizer_config.grad_clip_norm
        # Adam, not the authors' SGD: dL/dB carries eta1*eta2/n^2, so its
        # scale depends on the learning rates and batch size; Adam's steps
        # do not (each b_i moves by about the learning rate per visit).
        self.example_weight_optimizer = keras.optimizers.Adam(
            optimizer_config.example_weight_learning_rate,
            name="example_weight_optimizer",
        )
        self.weighting_optimizer = keras.optimizers.Adam(
            optimizer_config.weighting_learning_rate,
            name="weighting_optimizer",
        )
        self.example_weight_optimizer.build(
            [self.example_weight_table.values]
        )
        self.weighting_optimizer.build([self.weighting_table.values])
        if encoder is not None:
            self.encoder_optimizer = keras.optimizers.Adam(
                optimizer_config.encoder_learning_rate,
                name="encoder_optimizer",
            )
            self.encoder_optimizer.build(encoder.trainable_variables)

    def call(self, images, training=False):
        """Logits of the deployed learner: W1, W2 or their mean."""
        learner = self.config.evaluate_learner
        if learner == "w1":
            return self.classifier(images, training=training)
        w2_logits = self.w2_head(self.w2_trunk(images, training=training))
        if learner == "w2":
            return w2_logits
        return (self.classifier(images, training=training) + w2_logits) / 2

    def train_step(self, data):
        # The whole meta batch on every replica: softmax over validation
        # examples, u and r as on one device.
        train, meta = data["train"], distribute.gather_batch(data["meta"])
        w1_step, a, w2_step, val_loss, grads = self.hypergradients(train, meta)
        # Before any update: the alignment is taken at this step's W1 and B.
        self.diagnose(train, meta, grads, w1_step)
        # Under loss scaling a step with any non-finite value changes no
        # weight, momentum or optimizer slot (B, r and V are undone).
        finite = self.loss_scale.finite(
            grads + w1_step.params + w1_step.momenta + w2_step.params
            + w2_step.momenta)
        hyper_state = (self.hyper_state_variables()
                       if self.loss_scale.enabled else [])
        before = self.loss_scale.snapshot(hyper_state)
        self.apply_hypergradients(grads)
        self.loss_scale.restore_unless(finite, hyper_state, before)
        self.commit(self._kept(w1_step, self.w1, self.sgd, finite),
                    self._kept(w2_step, self.w2, self.w2_sgd, finite))
        # After every gradient of the step; `report` then logs the new S.
        self.loss_scale.update(finite)
        return self.report(train, a, w1_step, w2_step, val_loss)

    def _kept(self, step, learner, sgd, finite):
        """`step` if `finite`, else one that keeps W and the momenta."""
        return step._replace(
            params=self.loss_scale.select(finite, step.params,
                                          learner.variables),
            momenta=self.loss_scale.select(finite, step.momenta,
                                           sgd.momenta))

    def hyper_state_variables(self):
        """Every variable `apply_hypergradients` writes: B, r, V and their
        optimizers' moments and iteration counts."""
        optimizers = [self.example_weight_optimizer, self.weighting_optimizer]
        if self.encoder is not None:
            optimizers.append(self.encoder_optimizer)
        return self.hyper_variables() + [
            v for optimizer in optimizers for v in optimizer.variables]

    def hypergradients(self, train, meta):
        """Stages 1-3 without side effects on the learners.

        Returns:
          (W1 step, a float [B], W2 step, L_val, gradients aligned with
          `hyper_variables()`).
        """
        if self.config.hypergradient == "exact":
            with tf.GradientTape() as tape:
                stages = self.run_stages(train, meta)
            grads = distribute.scale_gradients(self.loss_scale.gradient(
                tape, stages[-1], self.hyper_variables()))
        else:
            *stages, grads = self.chained_step(train, meta)
        # Dense, zero where a variable has no path (e.g. V without x).
        grads = [
            tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
            for v, g in zip(self.hyper_variables(), grads)
        ]
        return tuple(stages) + (grads,)

    def run_stages(self, train, meta):
        """(W1 step, a, W2 step, objective) of stages 1-3, differentiable.

        The objective is `--lfm_objective`'s: L_val(W2') (`paper`,
        `shared`) or L_val(W1') + L_val(W2') (`both`).
        """
        w1_step = self.learn(train)
        w1_meta = None
        if (self.config.mistake_weighting == "learned"
                or self.config.lfm_objective == "both"):
            # u, shared by a and by `both`'s L_val(W1'): one forward pass.
            w1_meta = self.w1.losses(w1_step.params, meta["image"],
                                     meta["label"])
        a = self.weigh_mistakes(train, meta, w1_step.params, w1_meta)
        w2_step = self.relearn(train, self.relearn_weights(train, a),
                               w1_step.params)
        return w1_step, a, w2_step, self.validate(
            meta, w2_step.params,
            None if w1_meta is None else w1_meta[0])

    def b_ids(self, train):
        """Each training example's entry of B, int [B]: its position in
        the training set, or its observed label under
        `example_weight_granularity=class` (B's gradient then sums over a
        class's examples: `tf.scatter_nd` adds repeated ids)."""
        if self.config.example_weight_granularity == "class":
            return train["label"]
        return train["index"]

    def learn_weights(self, train):
        """Stage 1's per-example weights, float [B]: b_i, or under
        `example_weight_normalization=batch_mean` b_i / mean_batch(b) (B
        then ranks W1's examples and cannot scale its step)."""
        return mistake_weighting.normalize_weights(
            self.example_weight_table.gather(self.b_ids(train)),
            self.config.example_weight_normalization)

    def b_gradient(self, train, d_weights):
        """dL/dB, dense like B, from dL/d(stage 1's weights) (float [B]):
        back through the normalisation, then summed into B's entries."""
        if self.config.example_weight_normalization != "none":
            b = self.example_weight_table.gather(self.b_ids(train))
            with tf.GradientTape() as tape:
                tape.watch(b)
                weights = mistake_weighting.normalize_weights(
                    b, self.config.example_weight_normalization)
            d_weights = tape.gradient(
                weights, b, output_gradients=tf.cast(d_weights, b.dtype))
        return tf.scatter_nd(
            tf.cast(self.b_ids(train), tf.int64)[:, None], d_weights,
            tf.shape(self.example_weight_table.values, out_type=tf.int64),
        )

    def example_weights_by_position(self, train_labels):
        """b_i of every training example by position, float [N], from the
        observed training labels (int [N]; used under `class`)."""
        values = self.example_weight_table.values
        if self.config.example_weight_granularity == "class":
            return tf.gather(values, train_labels)
        return tf.convert_to_tensor(values)

    # Stage 1.
    def learn(self, train) -> Step:
        """W1' from the B-weighted training loss (paper stage 1)."""
        return self._unrolled_step(
            self.w1, self.sgd, self.w1.current(), train,
            self.learn_weights(train)
        )

    # Stage 2.
    def weigh_mistakes(self, train, meta, w1_params, w1_meta=None):
        """a (float [B]) from W1''s mistakes on the meta batch.

        Args:
          train, meta: the batches.
          w1_params: W1'.
          w1_meta: optional (u float [M], Forward) of W1' on the meta
            batch, if already computed.

        Returns:
          float [B]; ones under `--mistake_weighting=none` (a = 1).
        """
        if self.config.mistake_weighting == "none":
            return tf.ones(tf.shape(train["label"]), w1_params[-1].dtype)
        if w1_meta is None:
            w1_meta = self.w1.losses(w1_params, meta["image"], meta["label"])
        w1_val_losses, meta_out = w1_meta
        if self.encoder is None:
            train_embed = self.w1.forward(w1_params, train["image"]).features
            val_embed = meta_out.features
        else:
            train_embed = self.encoder(train["image"], training=True)
            val_embed = self.encoder(meta["image"], training=True)
        if self.config.weighting_mode == "by_id":
            r = self.weighting_table.gather(meta["index"])
        else:
            r = self.weighting_table.values
            batch = meta["label"].shape[0]
            if batch is not None and batch != self.weighting_table.size:
                raise ValueError(
                    f"Received a meta batch of {batch} examples but the "
                    f"positional r has length {self.weighting_table.size}; "
                    f"set --meta_batch_size={self.weighting_table.size} or "
                    "--weighting_mode=by_id."
                )
        if self.config.mistake_signal == "class":
            w1_val_losses = mistake_weighting.class_mean_losses(
                w1_val_losses, meta["label"], self.num_classes)
        a = mistake_weighting.example_weights_a(
            mistake_weighting.similarity(
                train_embed, val_embed, self.config.similarity
            ),
            mistake_weighting.same_label_mask(
                train["label"], meta["label"], train_embed.dtype
            ),
            w1_val_losses,
            tf.cast(r, train_embed.dtype),
            use_similarity=self.config.use_similarity,
            use_label_mask=self.config.use_label_mask,
            use_mistakes=self.config.use_mistakes,
            temperature=self.config.mistake_temperature,
            centered=self.config.mistake_centering,
        )
        return mistake_weighting.normalize_weights(
            a, self.config.weight_normalization
        )

    def relearn_weights(self, train, a):
        """W2's per-example weights: a (`paper`, `both`), or under `shared`
        b_i a_i / mean_k(b_k a_k) over the (global) batch, so B shapes W2's
        step by ranking examples, not by scaling its learning rate."""
        if self.config.lfm_objective != "shared":
            return a
        b = tf.cast(self.example_weight_table.gather(self.b_ids(train)),
                    a.dtype)
        return mistake_weighting.normalize_weights(b * a, "batch_mean")

    def relearn(self, train, a, w1_params) -> Step:
        """W2' from the a-weighted training loss (paper stage 2)."""
        return self._unrolled_step(
            self.w2, self.w2_sgd, self.w2_start(w1_params), train, a
        )

    def w2_start(self, w1_params):
        """W2's weights before its step; W1' where the two share variables."""
        shared = {id(v): p for v, p in zip(self.w1.variables, w1_params)}
        return [
            shared[id(v)] if id(v) in shared else tf.convert_to_tensor(v)
            for v in self.w2.variables
        ]

    # Stage 3.
    def validate(self, meta, w2_params, w1_val_losses=None):
        """Stage 3's objective of B, V and r: L_val(W2'), plus L_val(W1')
        = mean(u) under `--lfm_objective=both`.

        Args:
          meta: the meta batch.
          w2_params: W2'.
          w1_val_losses: u, float [M], W1''s per-example meta losses
            (needed under `both`).
        """
        losses, _ = self.w2.losses(w2_params, meta["image"], meta["label"])
        objective = tf.reduce_mean(losses)
        if self.config.lfm_objective == "both":
            if w1_val_losses is None:
                raise ValueError(
                    "Received lfm_objective='both' without W1''s meta "
                    "losses u; expected them from `run_stages`. Set "
                    "--hypergradient=exact.")
            objective += tf.reduce_mean(
                tf.cast(w1_val_losses, objective.dtype))
        return objective

    def state_variables(self):
        """BatchNorm statistics of W1, W2 and V."""
        encoder = [] if self.encoder is None else (
            self.encoder.non_trainable_variables)
        return _unique(self.w1.state_variables + self.w2.state_variables
                       + list(encoder))

    def hyper_variables(self):
        """[B, r, *V]: what stage 3 updates."""
        encoder_vars = (
            [] if self.encoder is None else self.encoder.trainable_variables
        )
        return [
            self.example_weight_table.values, self.weighting_table.values
        ] + list(encoder_vars)

    def chained_step(self, train, meta):
        """Stages 1-3 with the chain rule applied level by level.

        With s the step scale (`FunctionalSGD.step_scale`) and J the clip's
        Jacobian at each step's gradient (symmetric; the identity while the
        clip does not bind):

            dL/dw_i = -s2/n <grad l_i(W2_start), J2 v2>,   v2 = dL/dW2',
            dL/db_i = -s1/n <grad l_i(W1), J1 v1>,         v1 = dL/dW1',

        where w is W2's example weights (a; under `shared` w = b a /
        mean(b a), whose own derivative in b is added to dL/db by
        reverse mode through the normalisation), v1 comes back through a
        and, where W2 starts from W1' (PS trunk, single network), also
        through W2's start: (dW2'/dW2_start)^T v2 = v2 - s2 (wd v2 + H2 J2
        v2). `both` needs L_val(W1')'s own path and is exact only.

        `finite_difference` takes each mixed term <grad l_i, u> as DARTS'
        central difference of the per-example losses, over all weights, and
        H2 u forward-over-backward (a central difference of gradients is
        biased at ReLU kinks; `hypergradients.hessian_vector_product`). `first_order` takes
        everything over the heads only (the trunks' unrolled weights, and
        the trunk gradients' share of each clip norm, held constant), where
        per-example gradients and H2 have closed forms, so it costs no pass
        beyond the forward and backward passes the steps make anyway.
        """
        head_only = self.config.hypergradient == "first_order"
        w1_step = self.learn(train)
        w1_watched = self._watched(self.w1, w1_step.params, head_only)
        with tf.GradientTape() as tape:
            tape.watch(w1_watched)
            a = self.weigh_mistakes(train, meta, w1_step.params)
            # W2's weights: a, or `shared`'s normalised b a (B's second path).
            w2_weights = self.relearn_weights(train, a)
        fixed_weights = tf.stop_gradient(w2_weights)
        w2_start = self.w2_start(w1_step.params)
        w2_step = self.relearn(train, fixed_weights, w1_step.params)
        w2_watched = self._watched(self.w2, w2_step.params, head_only)
        with tf.GradientTape() as val_tape:
            val_tape.watch(w2_watched)
            val_loss = self.validate(meta, w2_step.params)
        v2 = _dense(distribute.scale_gradients(
            self.loss_scale.gradient(val_tape, val_loss, w2_watched)
        ), w2_watched)
        u2 = self._through_clip(self.w2, self.w2_sgd, w2_step, v2, head_only)
        d_weights = hypergradients.weight_hypergradient(
            self._mixed_term(self.w2, w2_start, w2_step, train, u2,
                             head_only),
            self._step_scale(self.w2_sgd, v2), tf.shape(a)[0],
        )
        encoder_vars = self.hyper_variables()[2:]
        grads = self.loss_scale.gradient(
            tape, w2_weights,
            [self.example_weight_table.values, self.weighting_table.values]
            + encoder_vars + w1_watched,
            output_gradients=d_weights,
        )
        # B's path through W2's weights: zero unless `shared`.
        b_direct, r_grad = grads[0], grads[1]
        encoder_grads = grads[2:2 + len(encoder_vars)]
        # dL/dW1' summed over replicas' a, per replica's share of the batch.
        v1 = distribute.replica_mean(self._add_shared(
            grads[2 + len(encoder_vars):], v2, u2, w2_start, w2_step, train,
            fixed_weights, head_only))
        v1 = _dense(v1, w1_watched)
        u1 = self._through_clip(self.w1, self.sgd, w1_step, v1, head_only)
        d_b = hypergradients.weight_hypergradient(
            self._mixed_term(self.w1, self.w1.current(), w1_step, train, u1,
                             head_only),
            self._step_scale(self.sgd, v1), tf.shape(a)[0],
        )
        b_grad = self.b_gradient(train, d_b)
        if b_direct is not None:
            b_grad += tf.cast(tf.convert_to_tensor(b_direct), b_grad.dtype)
        return w1_step, a, w2_step, val_loss, [b_grad, r_grad] + list(
            encoder_grads
        )

    @staticmethod
    def _watched(learner, params, head_only):
        """The W' tensors a direction is taken over: all, or the head's."""
        return list(params[learner.num_trunk_variables:] if head_only
                    else params)

    def _step_scale(self, sgd, like):
        """s of `sgd`'s step, in the float type of the directions `like`."""
        return sgd.step_scale(self.step_counter,
                              unroll.schedule_dtype(like[0].dtype))

    def _through_clip(self, learner, sgd, step, direction, head_only):
        """J_clip(g) v for the step's gradient g, over the watched weights.

        The clip acts on all of the learner's gradients together (summed
        over replicas, as `_unrolled_step` takes them). Over the heads only,
        the trunk's part of v is zero and the trunk's part of J v is dropped
        (the trunk does not move), which leaves the head block of J with
        the full norm: the trunk gradients' share of it is held constant.
        """
        if sgd.clip_norm is None:
            return direction
        split = learner.num_trunk_variables if head_only else 0
        full = [tf.zeros_like(p) for p in step.params[:split]] + list(
            direction)
        return sgd.clip_jvp(step.grads, full)[split:]

    def _mixed_term(self, learner, start, step, train, direction, head_only):
        """<grad l_i(W_start), v> for the training batch, float [B]."""
        direction = [
            tf.zeros_like(p) if d is None else d
            for p, d in zip(self._watched(learner, start, head_only),
                            direction)
        ]
        if head_only:
            return hypergradients.dense_head_directional_derivative(
                step.features, step.logits, train["label"], direction
            )
        method = self.config.hypergradient
        return hypergradients.directional_derivative(
            learner.loss_vector_fn(train["image"], train["label"]),
            start, direction,
            "finite_difference" if method == "finite_difference" else
            "forward", self.config.fd_epsilon,
            unit_direction=self.loss_scale.enabled,
        )

    def _add_shared(self, v1, v2, u2, w2_start, w2_step, train, a,
                    head_only):
        """v1 plus dL/dW2_start where W2 starts from W1' (PS trunk, single
        network): v2 - s2 (wd v2 + H2 u2), u2 = J_clip v2, on the shared
        weights (the momentum buffer is a constant of the step).

        Args:
          v1: dL/dW1' through a, over W1's watched weights.
          v2: dL/dW2', over W2's watched weights.
          u2: J_clip(g2) v2, shaped like v2.
          w2_start: W2's weights before its step.
          w2_step: W2's unrolled `Step`.
          train: the training batch.
          a: float [B], W2's example weights (constants here).
          head_only: `first_order`'s restriction to the heads.

        Returns:
          list shaped like v1.
        """
        w1_vars = self._watched(self.w1, self.w1.variables, head_only)
        w2_vars = self._watched(self.w2, self.w2.variables, head_only)
        w2_positions = {id(v): j for j, v in enumerate(w2_vars)}
        if not any(id(v) in w2_positions for v in w1_vars):
            return v1
        pulled = self.w2_sgd.start_vjp(
            v2, self._hessian_product(w2_start, w2_step, train, a, u2,
                                      head_only),
            self.step_counter, unroll.schedule_dtype(v2[0].dtype))
        return [
            _add(g, pulled[w2_positions[id(v)]]) if id(v) in w2_positions
            else g
            for v, g in zip(w1_vars, v1)
        ]

    def _hessian_product(self, start, step, train, a, direction, head_only):
        """H2 u: the Hessian of W2's a-weighted training loss (the mean over
        replicas, as its gradient is taken) at W2_start, along u."""
        if head_only:
            return distribute.replica_mean(
                hypergradients.dense_head_hessian_vector_product(
                    step.features, step.logits, a, direction))

        def gradient(params):
            with tf.GradientTape() as tape:
                tape.watch(params)
                losses, _ = self.w2.train_losses(params, train["image"],
                                                 train["label"])
                loss = tf.reduce_mean(tf.cast(a, losses.dtype) * losses)
            return distribute.replica_mean(
                self.loss_scale.gradient(tape, loss, params))

        return hypergradients.hessian_vector_product(gradient, start,
                                                     direction)

    def apply_hypergradients(self, grads):
        """One step of B's, r's and V's optimizers; B stays >= 0."""
        b_grad, r_grad, *encoder_grads = grads
        self.example_weight_optimizer.apply(
            [b_grad], [self.example_weight_table.values]
        )
        self.example_weight_table.project()
        self.apply_weighting_step(r_grad, encoder_grads)

    def apply_weighting_step(self, r_grad, encoder_grads):
        """One step of r's and V's optimizers, each gradient clipped to
        `--grad_clip_norm` over all replicas, as on one device."""
        self.weighting_optimizer.apply(
            distribute.clip_by_global_norm([r_grad], self.clip_norm),
            [self.weighting_table.values])
        if self.encoder is not None:
            self.encoder_optimizer.apply(
                distribute.clip_by_global_norm(encoder_grads, self.clip_norm),
                self.encoder.trainable_variables)

    def commit(self, w1_step, w2_step):
        """Assigns W1', W2' (computed once, in the unroll) as the real step.

        W2 is assigned last, so variables it shares with W1 (PS trunk, single
        network) end at W2'.
        """
        self.sgd.assign(self.w1.variables, w1_step.params, w1_step.momenta)
        self.w1.assign_states(w1_step.states)
        self.w2_sgd.assign(self.w2.variables, w2_step.params, w2_step.momenta)
        self.w2.assign_states(w2_step.states)

    def diagnose(self, train, meta, grads, w1_step):
        """Tracks |dL/dB| every step and, every `diagnostics_every` steps,
        `b_alignment` = cos(dL/dB, grad_B L_val(W1')).

        B descends dL/dB, so a positive alignment means B's step also
        lowers W1''s own validation loss; a negative one, that it raises it.
        Traced once: the extra pass runs inside a `tf.cond`, only on due
        steps.
        """
        b_grad = grads[0]
        self._trackers["b_grad_norm"].update_state(tf.norm(b_grad))
        every = self.config.diagnostics_every
        if not every:
            return
        if distribute.num_replicas() > 1:
            # Stage 1 all-reduces W1's gradient, and MirroredStrategy allows
            # no all-reduce inside a tf.cond (merge_call): computing it
            # every step would cost a third of the step, so it is skipped.
            logging.warning(
                "b_alignment is not computed with %d replicas (a tf.cond "
                "cannot hold stage 1's all-reduce); run on one device to "
                "see it.", distribute.num_replicas())
            return

        def alignment():
            cosine = diagnostics.cosine_similarity(
                b_grad, self.w1_validation_gradient(train, meta, w1_step))
            return tf.cast(cosine, tf.float32), tf.constant(1.0)

        def skipped():
            return tf.constant(0.0), tf.constant(0.0)

        due = tf.equal(self.step_counter % every, 0)
        value, weight = tf.cond(due, alignment, skipped)
        self._trackers["b_alignment"].update_state(value, weight)

    def w1_validation_gradient(self, train, meta, w1_step):
        """grad_B L_val(W1'), dense like B, by stage 1's chain rule in the
        run's hypergradient mode (no side effects):

            d L_val(W1') / db_i = -s1/n <grad l_i(W1), J1 v>,
            v = grad_{W1'} L_val(W1').

        One backward pass through the meta forward and one mixed term (a
        forward-mode JVP under `exact`, exact like it), not a second
        reverse pass through stage 1: that doubled the step's peak memory
        on its due steps (ResNet-32, batch 100: 1967 vs 1142 MB).
        """
        head_only = self.config.hypergradient == "first_order"
        watched = self._watched(self.w1, w1_step.params, head_only)
        with tf.GradientTape() as tape:
            tape.watch(watched)
            losses, _ = self.w1.losses(w1_step.params, meta["image"],
                                       meta["label"])
            loss = tf.reduce_mean(losses)
        v = _dense(self.loss_scale.gradient(tape, loss, watched), watched)
        u = self._through_clip(self.w1, self.sgd, w1_step, v, head_only)
        d_b = hypergradients.weight_hypergradient(
            self._mixed_term(self.w1, self.w1.current(), w1_step, train, u,
                             head_only),
            self._step_scale(self.sgd, v), tf.shape(train["label"])[0],
        )
        return self.b_gradient(train, d_b)

    def report(self, train, a, w1_step, w2_step, val_loss):
        b = self.example_weight_table.gather(self.b_ids(train))
        tail = diagnostics.class_membership(train["label"],
                                            self.tail_classes, a.dtype)
        self._trackers["a_head"].update_state(a, sample_weight=1.0 - tail)
        self._trackers["a_tail"].update_state(a, sample_weight=tail)
        self._trackers["b_head"].update_state(b, sample_weight=1.0 - tail)
        self._trackers["b_tail"].update_state(b, sample_weight=tail)
        corrupted = tf.cast(
            tf.not_equal(train["label"], train["clean_label"]), a.dtype
        )
        clean = 1.0 - corrupted
        self._trackers["a_min"].update_state(tf.reduce_min(a))
        self._trackers["a_max"].update_state(tf.reduce_max(a))
        self._trackers["b_min"].update_state(tf.reduce_min(b))
        self._trackers["b_max"].update_state(tf.reduce_max(b))
        self._trackers["a_clean"].update_state(a, sample_weight=clean)
        self._trackers["a_corrupted"].update_state(a, sample_weight=corrupted)
        self._trackers["b_clean"].update_state(b, sample_weight=clean)
        self._trackers["b_corrupted"].update_state(
            b, sample_weight=corrupted
        )
        return self.finish_step(
            train["label"], w1_step.logits,
            loss=w1_step.loss, w1_loss=w1_step.loss, w2_loss=w2_step.loss,
            val_loss=val_loss, a_mean=tf.reduce_mean(a),
            b_mean=tf.reduce_mean(b), **self.clip_fractions(w1_step, w2_step),
        )

    def clip_fractions(self, w1_step, w2_step):
        """Whether each learner's step clipped its gradient (1.0 or 0.0);
        their means over a run are the share of clipped steps."""
        return {
            "w1_clip_fraction": tf.cast(
                self.sgd.clip_binds(w1_step.grads), tf.float32),
            "w2_clip_fraction": tf.cast(
                self.w2_sgd.clip_binds(w2_step.grads), tf.float32),
        }

    def _unrolled_step(self, learner, sgd, params, train, weights) -> Step:
        with tf.GradientTape() as tape:
            tape.watch(params)
            losses, out = learner.train_losses(
                params, train["image"], train["label"]
            )
            loss = tf.reduce_mean(tf.cast(weights, losses.dtype) * losses)
        # Scaled and unscaled inside any outer tape: W' is unchanged and its
        # second-order path flows (loss_scale.py).
        grads = distribute.replica_mean(
            self.loss_scale.gradient(tape, loss, params))
        new_params, new_momenta = sgd.unroll(params, grads, self.step_counter)
        return Step(new_params, new_momenta, out.states, loss, out.logits,
                    out.features, grads)


def _unique(variables):
    """`variables` without repeats (W1 and W2 may share a trunk)."""
    seen = set()
    return [v for v in variables if not (id(v) in seen or seen.add(id(v)))]


def _dense(values, like):
    """`values` with None entries replaced by zeros shaped like `like`."""
    return [tf.zeros_like(p) if v is None else tf.convert_to_tensor(v)
            for v, p in zip(values, like)]


def _add(a, b):
    """a + b where None means zero."""
    if a is None:
        return b
    return a if b is None else a + b
