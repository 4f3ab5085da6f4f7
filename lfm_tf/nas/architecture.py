"""The architecture logits α: one row per edge, one column per candidate op.

All normal cells share `arch_normal` and all reduction cells `arch_reduce`
(research/nas.md §1.6). α is never in a learner's variable list: its own
optimizer updates it, with its own decay and clipping.
"""

import keras
import numpy as np
from keras import ops

from lfm_tf.nas import genotypes


@keras.saving.register_keras_serializable(package="lfm_tf")
class Architecture(keras.layers.Layer):
    """α for normal and reduction cells.

    Args:
      normal_ops: per edge, the op names of its columns (normal cells).
      reduce_ops: the same for reduction cells.
      steps: intermediate nodes per cell.
      init_scale: α starts at init_scale * N(0, 1) (DARTS: 1e-3; the noise
        only breaks ties).
      seed: initialiser seed.
    """

    def __init__(self, normal_ops, reduce_ops, steps=4, init_scale=1e-3,
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        self.normal_ops = tuple(tuple(e) for e in normal_ops)
        self.reduce_ops = tuple(tuple(e) for e in reduce_ops)
        self.steps = int(steps)
        widths = {len(e) for e in self.normal_ops + self.reduce_ops}
        if len(widths) != 1:
            raise ValueError(
                f"Received edges with {sorted(widths)} candidate ops; "
                "expected the same number on every edge (one α matrix)."
            )
        shape = (genotypes.num_edges(self.steps), widths.pop())
        init = keras.initializers.RandomNormal(stddev=init_scale, seed=seed)
        self.arch_normal = self.add_weight(
            shape=shape, initializer=init, name="arch_normal")
        self.arch_reduce = self.add_weight(
            shape=shape, initializer=init, name="arch_reduce")
        self.built = True

    def probabilities(self):
        """(normal float [E, K], reduce float [E, K]): row softmaxes."""
        return (ops.softmax(self.arch_normal, axis=-1),
                ops.softmax(self.arch_reduce, axis=-1))

    def numpy_probabilities(self):
        return tuple(np.asarray(ops.convert_to_numpy(p), np.float64)
                     for p in self.probabilities())

    def genotype(self) -> genotypes.Genotype:
        """DARTS' parse of the current α (every node concatenated)."""
        normal, reduce = self.numpy_probabilities()
        return genotypes.derive(normal, reduce, self.normal_ops,
                                self.reduce_ops, self.steps, self.steps)
