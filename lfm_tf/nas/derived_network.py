"""The network a genotype describes, trained from scratch (DARTS' evaluation
protocol, research/nas.md §4): stacked cells, drop path, auxiliary head.

`build_derived_classifier` returns a `backbones.Classifier` subclass, so the
derived network trains with any method of the engine, exports like any other
classifier and serves with TF Serving; the supernet never leaves the search.
"""

from typing import Optional

import keras
from keras import ops

from lfm_tf.models import backbones
from lfm_tf.nas import genotypes
from lfm_tf.nas import operations
from lfm_tf.nas import search_network


@keras.saving.register_keras_serializable(package="lfm_tf")
class DropPath(keras.layers.Layer):
    """Zeroes whole examples of an op's output with probability `rate`,
    scaling the rest by 1 / (1 - rate); `rate` is a variable set per epoch
    (no retrace). Shared by every op of a network: each call draws anew."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="rate")
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training:
            return inputs
        keep = 1.0 - ops.cast(self.rate, inputs.dtype)
        noise = keras.random.uniform((ops.shape(inputs)[0], 1, 1, 1),
                                     seed=self.seed_generator,
                                     dtype=inputs.dtype)
        return ops.where(noise < keep, inputs / keep, ops.zeros_like(inputs))


@keras.saving.register_keras_serializable(package="lfm_tf")
class DerivedCell(keras.layers.Layer):
    """One cell of a genotype: node i = op_2i(state) + op_2i+1(state).

    Args:
      genotype: `Genotype`.
      filters: C of this cell.
      reduction: a reduction cell (stride 2 on edges from the inputs).
      reduction_prev: the previous cell was one (s0 gets FactorizedReduce).
      drop_path: the network's shared `DropPath`.
    """

    def __init__(self, genotype, filters, reduction, reduction_prev,
                 drop_path, **kwargs):
        super().__init__(**kwargs)
        self.reduction = bool(reduction)
        self.filters = int(filters)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = (genotype.reduce_concat if reduction
                       else genotype.normal_concat)
        self.inputs_of = tuple(j for _, j in edges)
        self.preprocess0 = (
            operations.FactorizedReduce(filters, name="preprocess0")
            if reduction_prev else
            operations.ReLUConvBN(filters, name="preprocess0"))
        self.preprocess1 = operations.ReLUConvBN(filters, name="preprocess1")
        self.ops = [
            operations.build_op(op, filters,
                                2 if self.reduction and j < 2 else 1,
                                affine=True, layer_name=f"{op}_{i}")
            for i, (op, j) in enumerate(edges)
        ]
        self.drop_path = drop_path

    def build_cell(self, s0_shape, s1_shape):
        self.preprocess0.build(s0_shape)
        self.preprocess1.build(s1_shape)
        for op in self.ops:
            op.build((None, None, None, self.filters))
        self.built = True

    @property
    def output_channels(self):
        return len(self.concat) * self.filters

    def call(self, s0, s1, training=False):
        states = [self.preprocess0(s0, training=training),
                  self.preprocess1(s1, training=training)]
        for node in range(len(self.ops) // 2):
            total = None
            for i in (2 * node, 2 * node + 1):
                op = self.ops[i]
                out = op(states[self.inputs_of[i]], training=training)
                # DARTS drops every op's path except identities.
                if not isinstance(op, operations.Identity):
                    out = self.drop_path(out, training=training)
                total = out if total is None else total + out
            states.append(total)
        return ops.concatenate([states[i] for i in self.concat], axis=-1)


@keras.saving.register_keras_serializable(package="lfm_tf")
class AuxiliaryHead(keras.layers.Layer):
    """DARTS' CIFAR auxiliary classifier on the 2/3-depth cell's output:
    ReLU, 5x5 average pool stride 3, 1x1 conv 128, BN, ReLU, 2x2 conv 768,
    BN, ReLU, linear. Smaller feature maps than the paper's 8x8 are pooled
    to fit (same weights)."""

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.conv_a = keras.layers.Conv2D(128, 1, use_bias=False,
                                          name="conv_a")
        self.norm_a = operations.batch_norm(True, name="bn_a")
        self.conv_b = keras.layers.Conv2D(768, 2, padding="same",
                                          use_bias=False, name="conv_b")
        self.norm_b = operations.batch_norm(True, name="bn_b")
        self.classifier = keras.layers.Dense(num_classes, name="linear")

    def build(self, input_shape):
        self.conv_a.build((None, None, None, input_shape[-1]))
        self.norm_a.build((None, None, None, 128))
        self.conv_b.build((None, None, None, 128))
        self.norm_b.build((None, None, None, 768))
        self.classifier.build((None, 768))

    def call(self, inputs, training=False):
        x = ops.relu(inputs)
        size = inputs.shape[1]
        if size is not None and size >= 5:
            x = ops.average_pool(x, 5, strides=3, padding="valid")
        x = ops.relu(self.norm_a(self.conv_a(x), training=training))
        # At the paper's size the map is 2x2 here and the 2x2 conv (valid)
        # leaves 1x1; 'same' plus averaging gives that and fits smaller maps.
        x = self.conv_b(x)
        if x.shape[1] is not None and x.shape[1] >= 2:
            x = x[:, :x.shape[1] - 1, :x.shape[2] - 1, :]
        x = ops.relu(self.norm_b(x, training=training))
        return self.classifier(ops.mean(x, axis=(1, 2)))


@keras.saving.register_keras_serializable(package="lfm_tf")
class DerivedNetwork(keras.layers.Layer):
    """Stem, `layers` cells of a genotype, GAP: images [B,H,W,3] -> features
    [B, D]; with `num_classes`, also the auxiliary logits at 2/3 depth.

    Args:
      genotype: `Genotype`.
      channels: C of the first cells (36 in DARTS' CIFAR protocol).
      layers: cells (20); reductions at layers//3 and 2*layers//3.
      auxiliary_classes: build the auxiliary head for this many classes
        (0: none).
      stem_multiplier: the stem has stem_multiplier * C channels.
      seed: drop-path seed.
    """

    def __init__(self, genotype, channels, layers, auxiliary_classes=0,
                 stem_multiplier=3, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.genotype = genotype
        self.channels, self.layers = int(channels), int(layers)
        self.drop_path = DropPath(seed, name="drop_path")
        self.stem_conv = keras.layers.Conv2D(
            stem_multiplier * channels, 3, padding="same", use_bias=False,
            name="stem_conv")
        self.stem_norm = operations.batch_norm(True, name="stem_bn")
        self.reductions = search_network.reduction_positions(self.layers)
        self.auxiliary_position = 2 * self.layers // 3
        self.cells = [
            DerivedCell(genotype, c_curr, reduction, reduction_prev,
                        self.drop_path, name=f"cell_{i}")
            for i, (c_curr, reduction, reduction_prev) in enumerate(
                search_network.cell_plan(self.channels, self.layers))
        ]
        self.feature_dim = self.cells[-1].output_channels
        self.auxiliary_head = (
            AuxiliaryHead(auxiliary_classes, name="auxiliary_head")
            if auxiliary_classes else None)

    def build(self, input_shape):
        self.stem_conv.build((None, None, None, input_shape[-1]))
        stem = (None, None, None, self.stem_conv.filters)
        self.stem_norm.build(stem)
        s0 = s1 = stem
        for i, cell in enumerate(self.cells):
            cell.build_cell(s0, s1)
            s0, s1 = s1, (None, None, None, cell.output_channels)
            if i == self.auxiliary_position and self.auxiliary_head:
                self.auxiliary_head.build(s1)
        self.built = True

    def call(self, images, training=False):
        return self.features_and_auxiliary(images, training)[0]

    def features_and_auxiliary(self, images, training=False):
        """(features float [B, D], auxiliary logits float [B, C] or None)."""
        s0 = s1 = self.stem_norm(self.stem_conv(images), training=training)
        auxiliary = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, training=training)
            if (i == self.auxiliary_position and training
                    and self.auxiliary_head is not None):
                auxiliary = self.auxiliary_head(s1, training=training)
        return ops.mean(s1, axis=(1, 2)), auxiliary

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.feature_dim)


@keras.saving.register_keras_serializable(package="lfm_tf")
class DerivedClassifier(backbones.Classifier):
    """A `Classifier` over a `DerivedNetwork`, with the auxiliary loss.

    Args:
      trunk: `DerivedNetwork`.
      head: `Dense(C)`.
      auxiliary_weight: weight of the auxiliary CE in training (0.4 in
        DARTS; 0 turns it off).
      **kwargs: `Classifier` arguments.
    """

    def __init__(self, trunk, head, auxiliary_weight=0.0, **kwargs):
        self.auxiliary_weight = float(auxiliary_weight)
        super().__init__(trunk, head, **kwargs)

    def logits_and_auxiliary(self, images, training=False):
        """(logits [B, C], auxiliary logits [B, C] or None)."""
        features, auxiliary = self.trunk.features_and_auxiliary(
            images, training=training)
        return self.head(features), auxiliary

    def set_drop_path_rate(self, rate):
        self.trunk.drop_path.rate.assign(float(rate))


def build_derived_classifier(genotype, num_classes, input_shape, *,
                             channels=36, layers=20, auxiliary_weight=0.4,
                             seed: Optional[int] = None,
                             name="classifier") -> DerivedClassifier:
    """The derived network of `genotype` (a `Genotype`, a published name, a
    genotype.json path or its JSON text), built."""
    if not isinstance(genotype, genotypes.Genotype):
        genotype = genotypes.load(genotype)
    trunk = DerivedNetwork(
        genotype, channels, layers,
        auxiliary_classes=num_classes if auxiliary_weight else 0,
        seed=seed, name="trunk")
    head = keras.layers.Dense(int(num_classes), name="head")
    return DerivedClassifier(trunk, head, auxiliary_weight=auxiliary_weight,
                             input_shape=tuple(input_shape), name=name)


class DropPathSchedule(keras.callbacks.Callback):
    """rate_e = max_rate * e / epochs at the start of epoch e (DARTS)."""

    def __init__(self, classifier, max_rate, epochs):
        super().__init__()
        self.classifier, self.max_rate = classifier, float(max_rate)
        self.epochs = int(epochs)

    def on_epoch_begin(self, epoch, logs=None):
        self.classifier.set_drop_path_rate(
            self.max_rate * epoch / self.epochs)
