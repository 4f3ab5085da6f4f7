"""LFM-DARTS and LFM-PDARTS: the three-stage update with B = α (DESIGN §1).

W1 and W2 are two supernets evaluated under the same α (or one supernet
trunk with two heads under PS). Per step:

1. learn:    W1' = W1 - eta1 grad_W1 L_train(W1, α)
2. relearn:  a from W1''s mistakes on the validation batch (u), V (x) and
             labels (z); W2' = W2 - eta2 grad_W2 mean(a * l(W2, α))
3. validate: α, V and r descend L_val(W2', α), through both unrolled steps.
   Under `--lfm_objective=both` they descend L_val(W1', α) + L_val(W2', α).

Unlike the authors' code (lfm_reference §2.4) α's gradient is exact: it
includes α's path through W1' into u (their detached copy drops it) and no
finite-difference Hessian products are involved. P-DARTS' version unrolls
W1 as well (theirs uses the current W1). The stages run as in LFM-DR
(`lfm.LFM`), whose per-example table B is unused here (size 1).

Under `mixed_float16` the stages scale their gradients as LFM-DR does (the
supernets compute in float16; α, its softmax and the losses stay float32),
and a non-finite step also restores α and its Adam state.
"""

import tensorflow as tf

from lfm_tf.methods import darts
from lfm_tf.methods import learners
from lfm_tf.methods import lfm


class LFMDarts(lfm.LFM):
    """LFM over a supernet, α in the role of B.

    Args:
      *args: `lfm.LFM` arguments, without `num_train`.
      architecture: `nas.Architecture` shared by W1 and W2.
      search_config: `SearchConfig` (α's optimizer).
      **kwargs: `lfm.LFM` keyword arguments.
    """

    METRIC_NAMES = ("loss", "w1_loss", "w2_loss", "val_loss", "a_mean",
                    "a_min", "a_max", "arch_entropy", "w1_clip_fraction",
                    "w2_clip_fraction")

    def __init__(self, *args, architecture, search_config, **kwargs):
        super().__init__(*args, num_train=1, **kwargs)
        if self.config.hypergradient != "exact":
            raise ValueError(
                f"Received hypergradient={self.config.hypergradient!r} for "
                "lfm_darts; expected `exact` (α's gradient through both "
                "unrolled steps). Set --hypergradient=exact."
            )
        if self.config.lfm_objective == "shared":
            raise ValueError(
                "Received lfm_objective='shared' for lfm_darts; expected "
                "`paper` or `both`: here B is the architecture α, which has "
                "no per-example weights to share with W2's step. Set "
                "--lfm_objective=both.")
        if self.config.evaluate_learner == "ensemble":
            raise ValueError(
                "Received evaluate_learner='ensemble' for lfm_darts; "
                "expected `w1` or `w2` (a search derives one genotype, "
                "retrained alone). Set --evaluate_learner=w1.")
        self.architecture = architecture
        self.arch_step = darts.ArchitectureStep(architecture, search_config)
        self.w1 = learners.Learner(self.classifier.trunk,
                                   self.classifier.head, architecture)
        self.w2 = learners.Learner(self.w2_trunk, self.w2_head, architecture)
        self.arch_updates = True

    def call(self, images, training=False):
        learner = self.w2 if self.config.evaluate_learner == "w2" else self.w1
        return learner(images, training=training)

    def train_step(self, data):
        if not self.arch_updates:
            return self.warmup_step(data["train"])
        return super().train_step(data)

    def warmup_step(self, train):
        """P-DARTS' weight-only epochs: W1 descends L_train(W1, α).

        Under loss scaling a non-finite step keeps W1 and its momenta.
        """
        step = self.learn(train)
        finite = self.loss_scale.finite(step.params + step.momenta)
        step = self._kept(step, self.w1, self.sgd, finite)
        self.sgd.assign(self.w1.variables, step.params, step.momenta)
        self.w1.assign_states(step.states)
        return self.finish_step(train["label"], step.logits, finite=finite,
                                loss=step.loss, w1_loss=step.loss)

    def diagnose(self, train, meta, grads, w1_step):
        """None here: B's diagnostics concern per-example weights."""
        del train, meta, grads, w1_step

    def learn(self, train):
        """Stage 1: W1' from the unweighted training loss under α."""
        ones = tf.ones(tf.shape(train["label"]), tf.float32)
        return self._unrolled_step(self.w1, self.sgd, self.w1.current(),
                                   train, ones)

    def hyper_variables(self):
        """[α normal, α reduce, r, *V]."""
        encoder_vars = ([] if self.encoder is None
                        else self.encoder.trainable_variables)
        return (self.arch_step.variables + [self.weighting_table.values]
                + list(encoder_vars))

    def hyper_state_variables(self):
        """LFM's (r, V, their optimizers) plus α and α's Adam state."""
        # Named, not super(): autograph mis-converts a zero-argument super()
        # in a traced step.
        return lfm.LFM.hyper_state_variables(self) + list(
            self.arch_step.optimizer.variables)

    def apply_hypergradients(self, grads):
        arch_grads, (r_grad, *encoder_grads) = grads[:2], grads[2:]
        self.arch_step.apply(arch_grads)
        self.apply_weighting_step(r_grad, encoder_grads)

    def report(self, train, a, w1_step, w2_step, val_loss):
        normal, reduce = self.architecture.probabilities()
        self._trackers["a_min"].update_state(tf.reduce_min(a))
        self._trackers["a_max"].update_state(tf.reduce_max(a))
        return self.finish_step(
            train["label"], w1_step.logits, loss=w1_step.loss,
            w1_loss=w1_step.loss, w2_loss=w2_step.loss, val_loss=val_loss,
            a_mean=tf.reduce_mean(a),
            arch_entropy=(darts.entropy(normal) + darts.entropy(reduce)) / 2,
            **self.clip_fractions(w1_step, w2_step))

    def copy_w1_to_w2(self):
        """Starts W2 from W1 where they are separate (the authors do this
        when the architecture updates begin)."""
        shared = {id(v) for v in self.w1.variables}
        for target, source in zip(self.w2.variables, self.w1.variables):
            if id(target) not in shared:
                target.assign(source)
