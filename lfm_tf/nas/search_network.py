"""The DARTS supernet: mixed ops on every edge of stacked search cells.

The network holds the operation weights w only. The architecture logits α
live in `architecture.Architecture`, outside, and reach the network as a call
argument (`arch_weights`, their row softmax), so that w and α stay separate
lists everywhere (two optimizers, weight decay and clipping on w only), and a
learner can be evaluated at any (W', α) pair, which the unrolled methods
need (research/nas.md §1.6).
"""

from typing import Optional, Sequence, Tuple

import keras
from keras import ops

from lfm_tf.models import backbones
from lfm_tf.nas import genotypes
from lfm_tf.nas import operations

# One tuple of op names per edge: the columns of that edge's α row.
EdgeOps = Sequence[Sequence[str]]


def full_space(steps=4, primitives=operations.PRIMITIVES) -> Tuple:
    """Every edge with every op (DARTS; P-DARTS' first stage)."""
    return tuple(tuple(primitives) for _ in range(genotypes.num_edges(steps)))


def reduction_positions(layers: int) -> Tuple[int, ...]:
    """Cells at 1/3 and 2/3 depth halve the resolution (nas.md §1.5)."""
    return tuple(sorted({layers // 3, 2 * layers // 3}))


def cell_plan(channels, layers):
    """(C, reduction, reduction_prev) per cell: C doubles at each reduction
    cell (layers//3 and 2*layers//3), and the cell after one gets s0 at
    twice its resolution."""
    plan, c_curr, reduction_prev = [], int(channels), False
    reductions = reduction_positions(layers)
    for i in range(layers):
        reduction = i in reductions
        if reduction:
            c_curr *= 2
        plan.append((c_curr, reduction, reduction_prev))
        reduction_prev = reduction
    return plan


@keras.saving.register_keras_serializable(package="lfm_tf")
class MixedOp(keras.layers.Layer):
    """sum_k p_k op_k(x) over one edge's candidate ops.

    `none` adds exactly zero, so it is not evaluated; its logit still takes
    softmax mass, which is all it does in DARTS.

    Args:
      filters: channels.
      stride: 1 or 2.
      op_names: this edge's candidates, in α column order.
      skip_dropout: the P-DARTS skip-connect dropout rate variable (shared by
        the network), or None.
    """

    def __init__(self, filters, stride, op_names, skip_dropout=None,
                 **kwargs):
        # `weights` keep α's dtype (see `call`); the ops cast their inputs.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.op_names = tuple(op_names)
        # Columns of the evaluated ops (all but `none`).
        self.columns = tuple(
            k for k, name in enumerate(self.op_names) if name != "none")
        self.ops = [
            operations.build_op(self.op_names[k], filters, stride,
                                affine=False, search=True,
                                layer_name=f"{self.op_names[k]}_{k}")
            for k in self.columns
        ]
        self.stride = int(stride)
        self.skip_dropout = skip_dropout

    def build(self, input_shape):
        for op in self.ops:
            op.build(input_shape)

    def call(self, inputs, weights, training=False):
        """sum_k p_k op_k(inputs).

        Under mixed precision the ops compute in float16/bfloat16 but the
        sum is taken in `weights`' dtype (float32): α's gradient
        p_k (dp_k - sum_j p_j dp_j), dp_k = sum(op_k(x) * dL/dy) over every
        element, is a difference of nearly equal sums near uniform α, which
        float16 sums and rounding lose (measured: a second-order α
        gradient 2.8x off; tests/mixed_precision_test.py). It costs a float32
        copy of each op's output for the backward pass.

        Args:
          inputs: float [B,H,W,C], the compute dtype.
          weights: float [K], this edge's softmaxed α (α's dtype).

        Returns:
          float [B,H',W',C] in `inputs`' dtype.
        """
        total = None
        for k, op in zip(self.columns, self.ops):
            if isinstance(op, operations.Identity):
                out = inputs
                if self.skip_dropout is not None:
                    out = self.skip_dropout(out, training=training)
            else:
                out = op(inputs, training=training)
            term = weights[k] * ops.cast(out, weights.dtype)
            total = term if total is None else total + term
        if total is None:  # only `none` left on this edge
            return inputs[:, ::self.stride, ::self.stride, :] * 0.0
        return ops.cast(total, inputs.dtype)


@keras.saving.register_keras_serializable(package="lfm_tf")
class ScheduledDropout(keras.layers.Layer):
    """Element-wise dropout whose rate is a variable set per epoch (P-DARTS'
    skip-connect dropout), so changing it does not retrace."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="rate"
        )
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training:
            return inputs
        keep = 1.0 - ops.cast(self.rate, inputs.dtype)
        noise = keras.random.uniform(ops.shape(inputs),
                                     seed=self.seed_generator,
                                     dtype=inputs.dtype)
        return ops.where(noise < keep, inputs / keep, ops.zeros_like(inputs))


@keras.saving.register_keras_serializable(package="lfm_tf")
class SearchCell(keras.layers.Layer):
    """A search cell: preprocess the two inputs, `steps` nodes each summing
    mixed ops over all earlier states, concat of the last `multiplier`.

    Args:
      filters: C of this cell.
      reduction: stride 2 on edges from the two inputs.
      reduction_prev: the previous cell halved the resolution (s0 is then
        twice the size of s1 and gets a FactorizedReduce).
      edge_ops: per edge, its candidate op names.
      steps: intermediate nodes.
      multiplier: nodes concatenated into the output (default: all).
      skip_dropout: shared `ScheduledDropout` or None.
    """

    def __init__(self, filters, reduction, reduction_prev, edge_ops,
                 steps=4, multiplier=None, skip_dropout=None, **kwargs):
        # `weights` pass to the mixed ops in α's dtype; s0 and s1 are cast by
        # the preprocessing layers.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.reduction = bool(reduction)
        self.steps = int(steps)
        self.multiplier = int(multiplier or steps)
        self.preprocess0 = (
            operations.FactorizedReduce(filters, affine=False,
                                        name="preprocess0")
            if reduction_prev else
            operations.ReLUConvBN(filters, affine=False, name="preprocess0")
        )
        self.preprocess1 = operations.ReLUConvBN(filters, affine=False,
                                                 name="preprocess1")
        self.edges = []
        edge = 0
        for node in range(self.steps):
            for j in range(node + 2):
                stride = 2 if self.reduction and j < 2 else 1
                self.edges.append(MixedOp(
                    filters, stride, edge_ops[edge], skip_dropout,
                    name=f"edge_{edge}"))
                edge += 1
        self.filters = int(filters)

    def build_cell(self, s0_shape, s1_shape):
        """Builds every op for inputs of these shapes (B, H, W, C)."""
        self.preprocess0.build(s0_shape)
        self.preprocess1.build(s1_shape)
        inner = (None, None, None, self.filters)
        for op in self.edges:
            op.build(inner)
        self.built = True

    def call(self, s0, s1, weights, training=False):
        """Args: s0, s1 float [B,H,W,*]; weights float [E, K]."""
        states = [self.preprocess0(s0, training=training),
                  self.preprocess1(s1, training=training)]
        edge = 0
        for node in range(self.steps):
            total = None
            for j in range(node + 2):
                out = self.edges[edge](states[j], weights[edge],
                                       training=training)
                total = out if total is None else total + out
                edge += 1
            states.append(total)
        return ops.concatenate(states[-self.multiplier:], axis=-1)


@keras.saving.register_keras_serializable(package="lfm_tf")
class SearchNetwork(keras.layers.Layer):
    """Stem, `layers` search cells, global average pooling: the supernet
    trunk, images float [B,H,W,3] -> features float [B, 4 * C_last].

    Args:
      channels: C of the first cells (16 in DARTS).
      layers: number of cells; reductions at layers//3 and 2*layers//3.
      normal_ops: per edge, the candidate ops of normal cells.
      reduce_ops: per edge, the candidate ops of reduction cells.
      steps: intermediate nodes per cell.
      multiplier: nodes concatenated per cell (default: all).
      stem_multiplier: the stem has stem_multiplier * C channels.
      skip_dropout: build P-DARTS' skip-connect dropout (rate set later).
      seed: dropout seed.
    """

    def __init__(self, channels, layers, normal_ops, reduce_ops, steps=4,
                 multiplier=None, stem_multiplier=3, skip_dropout=False,
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.layers = int(channels), int(layers)
        self.steps = int(steps)
        self.multiplier = int(multiplier or steps)
        self.normal_ops = tuple(tuple(e) for e in normal_ops)
        self.reduce_ops = tuple(tuple(e) for e in reduce_ops)
        for kind, edge_ops in (("normal", self.normal_ops),
                               ("reduce", self.reduce_ops)):
            if len(edge_ops) != genotypes.num_edges(self.steps):
                raise ValueError(
                    f"Received {len(edge_ops)} {kind} edges; expected "
                    f"{genotypes.num_edges(self.steps)} for {steps} nodes."
                )
        self.skip_dropout = (
            ScheduledDropout(seed, name="skip_dropout") if skip_dropout
            else None
        )
        self.stem_conv = keras.layers.Conv2D(
            stem_multiplier * channels, 3, padding="same", use_bias=False,
            kernel_initializer="he_normal", name="stem_conv",
        )
        self.stem_norm = operations.batch_norm(True, name="stem_bn")
        self.reductions = reduction_positions(self.layers)
        self.cells = [
            SearchCell(c_curr, reduction, reduction_prev,
                       self.reduce_ops if reduction else self.normal_ops,
                       self.steps, self.multiplier, self.skip_dropout,
                       name=f"cell_{i}")
            for i, (c_curr, reduction, reduction_prev) in enumerate(
                cell_plan(self.channels, self.layers))
        ]
        self.feature_dim = self.multiplier * self.cells[-1].filters

    def build(self, input_shape):
        # Weights depend on channels only: spatial sizes stay unknown so
        # Keras' size checks do not see a kernel larger than a small input.
        self.stem_conv.build((None, None, None, input_shape[-1]))
        stem = (None, None, None, self.stem_conv.filters)
        self.stem_norm.build(stem)
        s0 = s1 = stem
        for cell in self.cells:
            cell.build_cell(s0, s1)
            s0, s1 = s1, (None, None, None, self.multiplier * cell.filters)
        self.built = True

    def call(self, images, arch_weights: Optional[Tuple] = None,
             training=False):
        """Features of `images` under architecture `arch_weights`.

        Args:
          images: float [B, H, W, 3].
          arch_weights: (normal float [E, K], reduce float [E, K]) row
            softmaxes of α; None means uniform (used only to build).
          training: batch statistics in BN, dropout on.

        Returns:
          float [B, feature_dim], in the variables' dtype.
        """
        if arch_weights is None:
            arch_weights = tuple(
                ops.ones((len(e), len(e[0]))) / len(e[0])
                for e in (self.normal_ops, self.reduce_ops)
            )
        normal, reduce = arch_weights
        s0 = s1 = self.stem_norm(self.stem_conv(images), training=training)
        for cell in self.cells:
            weights = reduce if cell.reduction else normal
            s0, s1 = s1, cell(s0, s1, weights, training=training)
        # Features in the variables' dtype (float32 under mixed precision,
        # a no-op otherwise): the pooling sums in full precision and the
        # similarities of LFM-DARTS' PS are float32 like its losses.
        return ops.mean(ops.cast(s1, self.variable_dtype), axis=(1, 2))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.feature_dim)

    def set_skip_dropout(self, rate: float):
        """Sets P-DARTS' skip-connect dropout rate (no retrace)."""
        if self.skip_dropout is None:
            if rate:
                raise ValueError(
                    f"Received skip dropout rate {rate} for a network built "
                    "without skip dropout; build it with skip_dropout=True."
                )
            return
        self.skip_dropout.rate.assign(float(rate))


def build_supernet(num_classes, input_shape, *, channels, cells, normal_ops,
                   reduce_ops, steps=4, skip_dropout=False, seed=None,
                   name="supernet"):
    """A supernet `Classifier` (trunk `SearchNetwork`, linear head), built.

    Args:
      num_classes: C.
      input_shape: (H, W, 3).
      channels: C of the first cells.
      cells: number of cells.
      normal_ops / reduce_ops: per edge, its candidate op names.
      steps: intermediate nodes per cell.
      skip_dropout: build P-DARTS' skip-connect dropout.
      seed: dropout seed.
      name: model name.
    """
    trunk = SearchNetwork(channels, cells, normal_ops, reduce_ops, steps,
                          skip_dropout=skip_dropout, seed=seed, name="trunk")
    head = keras.layers.Dense(int(num_classes), name="head")
    return backbones.Classifier(trunk, head, input_shape=tuple(input_shape),
                                name=name)
