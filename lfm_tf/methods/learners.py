"""A learner evaluated at arbitrary weights: trunk then head, stateless.

The multilevel methods evaluate networks at unrolled weights W' that exist
only as tensors, so every forward goes through `Layer.stateless_call`. A
`Learner` is a (trunk, head) pair; two learners may share a trunk object,
which is how parameter sharing (PS, paper Table X) is expressed: W1 and W2
share the trunk and keep separate heads.
"""

from typing import List, NamedTuple, Sequence

import tensorflow as tf

from lfm_tf.reweighting import mistake_weighting


class Forward(NamedTuple):
    """Outputs of one functional forward pass.

    Attributes:
      logits: float [B, C].
      features: float [B, D], the trunk output (V under PS).
      states: new non-trainable values (BatchNorm statistics), per variable.
    """

    logits: tf.Tensor
    features: tf.Tensor
    states: List[tf.Tensor]


class Learner:
    """Trunk + head evaluated functionally.

    Args:
      trunk: layer mapping images float [B,H,W,3] -> features float [B,D].
      head: layer mapping features -> logits float [B,C].
      architecture: for a supernet trunk, the `nas.Architecture` whose
        current α every forward pass reads (so tapes see α as a variable);
        None for ordinary networks.
      training_loss: (labels int [B], logits float [B, C]) -> float [B],
        the per-example loss of this learner's training steps (`--loss`,
        `methods.losses.TrainingLoss`); None: CE. `losses` (meta and
        validation batches) is always CE.
    """

    def __init__(self, trunk, head, architecture=None, training_loss=None):
        self.trunk = trunk
        self.head = head
        self.architecture = architecture
        self.training_loss = (
            training_loss or mistake_weighting.per_example_cross_entropy)

    @property
    def variables(self):
        """Trainable variables: trunk's, then head's."""
        return list(self.trunk.trainable_variables) + list(
            self.head.trainable_variables
        )

    @property
    def state_variables(self):
        """Non-trainable variables (BN moving statistics), trunk then head."""
        return list(self.trunk.non_trainable_variables) + list(
            self.head.non_trainable_variables
        )

    @property
    def num_trunk_variables(self):
        return len(self.trunk.trainable_variables)

    def current(self):
        """The current weights as tensors (a fresh point to differentiate at)."""
        return [tf.convert_to_tensor(v) for v in self.variables]

    def forward(self, params, images, training=True) -> Forward:
        """Evaluates the learner at `params` (trainable tensors, in order)."""
        split = self.num_trunk_variables
        trunk_states = [
            tf.convert_to_tensor(v) for v in self.trunk.non_trainable_variables
        ]
        head_states = [
            tf.convert_to_tensor(v) for v in self.head.non_trainable_variables
        ]
        trunk_args = {}
        if self.architecture is not None:
            trunk_args["arch_weights"] = self.architecture.probabilities()
        features, trunk_states = self.trunk.stateless_call(
            list(params[:split]), trunk_states, images, training=training,
            **trunk_args,
        )
        logits, head_states = self.head.stateless_call(
            list(params[split:]), head_states, features, training=training
        )
        return Forward(logits, features, list(trunk_states) + list(head_states))

    def __call__(self, images, training=False):
        """Logits at the current weights (evaluation, export of W1)."""
        trunk_args = {}
        if self.architecture is not None:
            trunk_args["arch_weights"] = self.architecture.probabilities()
        return self.head(self.trunk(images, training=training, **trunk_args))

    def losses(self, params, images, labels, training=True):
        """Per-example CE at `params` -> (float [B], Forward)."""
        out = self.forward(params, images, training=training)
        return (
            mistake_weighting.per_example_cross_entropy(labels, out.logits),
            out,
        )

    def train_losses(self, params, images, labels, training=True):
        """Per-example training loss l_i at `params` -> (float [B], Forward).

        What every step that trains this learner descends; equal to
        `losses` under `--loss=ce`.
        """
        out = self.forward(params, images, training=training)
        return self.training_loss(labels, out.logits), out

    def loss_vector_fn(self, images, labels, training=True):
        """A pure function params -> per-example training losses l_i (the
        mixed terms <grad l_i, v> of the training batch)."""

        def fn(params):
            return self.train_losses(params, images, labels, training)[0]

        return fn

    def assign_states(self, states: Sequence[tf.Tensor]):
        """Makes the BN statistics of a forward pass real."""
        for variable, value in zip(self.state_variables, states):
            variable.assign(value)
