"""Backbones: shapes, sizes, stateless and second-order evaluation."""

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf import config as config_lib
from lfm_tf import testing
from lfm_tf.models import backbones
from lfm_tf.models import layers

SMALL_CNN = config_lib.ModelConfig(backbone="small_cnn", width=4)
RESNET8 = config_lib.ModelConfig(backbone="resnet8")
RESNET32 = config_lib.ModelConfig(backbone="resnet32")
# WRN-10-1 with dropout: the WRN code path at a test-sized scale.
TINY_WRN = config_lib.ModelConfig(backbone="wrn28_10", depth=10, width=1,
                                  dropout=0.3)


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def _images(batch, side, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.normal(size=(batch, side, side, 3)), dtype=dtype)


def _loss_gradient(model, params, states, images, labels):
    """d mean CE / d params at `params`, evaluated with stateless_call."""
    with tf.GradientTape() as tape:
        tape.watch(params)
        logits, _ = model.stateless_call(params, states, images, training=True)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        )
    return tape.gradient(loss, params)


def _hessian_vector_error(model, images, labels):
    """|Hv (nested tapes) - central differences of the gradient| / |Hv|."""
    params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    states = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
    rng = np.random.default_rng(1)
    direction = [rng.normal(size=p.shape) for p in params]
    # A unit direction: the step moves the weights by `step` in all, so no
    # ReLU input crosses zero between the two evaluations.
    norm = np.sqrt(sum(np.sum(d**2) for d in direction))
    direction = [tf.constant(d / norm, dtype=p.dtype)
                 for d, p in zip(direction, params)]
    with tf.GradientTape() as outer:
        outer.watch(params)
        grads = _loss_gradient(model, params, states, images, labels)
        projected = tf.add_n([
            tf.reduce_sum(g * d) for g, d in zip(grads, direction)
        ])
    analytic = outer.gradient(projected, params)
    step = 1e-6
    plus = _loss_gradient(
        model, [p + step * d for p, d in zip(params, direction)], states,
        images, labels)
    minus = _loss_gradient(
        model, [p - step * d for p, d in zip(params, direction)], states,
        images, labels)
    analytic = tf.concat([tf.reshape(a, [-1]) for a in analytic], 0)
    numeric = tf.concat(
        [tf.reshape((p - m) / (2 * step), [-1]) for p, m in zip(plus, minus)],
        0)
    return float(tf.norm(analytic - numeric) / tf.norm(analytic))


class BackboneTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(
        (SMALL_CNN, 8, 16), (SMALL_CNN, 32, 16), (RESNET8, 32, 64),
        (RESNET32, 8, 64),
        (RESNET32, 32, 64), (TINY_WRN, 8, 64), (TINY_WRN, 32, 64),
    )
    def test_shapes_and_dtypes(self, config, side, feature_dim):
        model = backbones.build_backbone(config, 7, (side, side, 3))
        images = _images(2, side)
        logits = model(images)
        self.assertEqual(logits.shape, (2, 7))
        self.assertEqual(logits.dtype, tf.float32)
        self.assertEqual(model.feature_dim, feature_dim)
        self.assertEqual(model.num_classes, 7)
        self.assertEqual(model.features(images, training=True).shape,
                         (2, feature_dim))
        self.assertEqual(model(images, training=True).shape, (2, 7))

    def test_resnet32_parameter_count(self):
        model = backbones.build_backbone(RESNET32, 10, (8, 8, 3))
        # Option-A shortcuts: 464,154 = He et al.'s 0.46M (within 0.1%).
        self.assertEqual(_count(model.trainable_variables), 464_154)
        self.assertEqual(sum(
            isinstance(l, backbones.SubsampleZeroPad)
            for l in model.trunk.layers), 2)
        projected = backbones.cifar_resnet_trunk(32, (8, 8, 3), shortcut="B")
        self.assertEqual(_count(projected.trainable_variables) + 650, 466_906)

    @parameterized.parameters(("resnet8", 8, 75_290),
                              ("resnet20", 20, 269_722),
                              ("resnet32", 32, 464_154))
    def test_cifar_resnet_choices(self, backbone, depth, parameters):
        model = backbones.build_backbone(
            config_lib.ModelConfig(backbone=backbone), 10, (32, 32, 3))
        # Depth 6n + 2 counts the stem, 6n block convolutions and the head;
        # option-A shortcuts add no convolution, so the trunk has 6n + 1.
        convs = [l for l in model.trunk.layers
                 if isinstance(l, keras.layers.Conv2D)]
        self.assertLen(convs, depth - 1)
        self.assertEqual(sum(
            isinstance(l, backbones.SubsampleZeroPad)
            for l in model.trunk.layers), 2)
        # He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-32 0.46M.
        self.assertEqual(_count(model.trainable_variables), parameters)
        self.assertEqual(model.feature_dim, 64)
        config_lib.ModelConfig(backbone=backbone).validate()

    def test_wide_resnet_parameter_counts(self):
        # Zagoruyko & Komodakis 2016, Table 1/2: WRN-28-10 36.5M and
        # WRN-16-2 0.7M (10 classes). Building 28-10 takes ~1 s.
        wrn28 = backbones.build_backbone(
            config_lib.ModelConfig(backbone="wrn28_10"), 10, (8, 8, 3))
        self.assertEqual(_count(wrn28.trainable_variables), 36_479_194)
        self.assertEqual(wrn28.feature_dim, 640)
        wrn16 = backbones.build_backbone(
            config_lib.ModelConfig(backbone="wrn28_10", depth=16, width=2),
            10, (8, 8, 3))
        self.assertEqual(_count(wrn16.trainable_variables), 691_674)

    def test_widen_factor_rule(self):
        config = config_lib.ModelConfig(backbone="wrn28_10", depth=10)
        self.assertEqual(backbones.wrn_widen_factor(config), 10)
        narrow = dataclasses.replace(config, width=2)
        self.assertEqual(backbones.wrn_widen_factor(narrow), 2)
        model = backbones.build_backbone(narrow, 3, (8, 8, 3))
        self.assertEqual(model.feature_dim, 128)
        model = backbones.build_backbone(narrow, 3, (8, 8, 3), widen_factor=1)
        self.assertEqual(model.feature_dim, 64)

    def test_structure(self):
        model = backbones.build_backbone(TINY_WRN, 3, (8, 8, 3))
        # Built on construction: variables exist before any call.
        self.assertTrue(model.built)
        trunk_vars, head_vars = backbones.trunk_and_head_variables(model)
        self.assertEqual(
            [v.path for v in model.trainable_variables],
            [v.path for v in trunk_vars + head_vars])
        self.assertEqual([v.path for v in head_vars],
                         [v.path for v in model.head.trainable_variables])
        self.assertLen(head_vars, 2)
        for config in (SMALL_CNN, RESNET32, TINY_WRN):
            trunk = backbones.build_trunk(config, (8, 8, 3))
            kinds = {type(l) for l in trunk.layers}
            self.assertIn(layers.BatchNorm, kinds)
            self.assertNotIn(keras.layers.BatchNormalization, kinds)
            self.assertNotIn(keras.layers.MaxPooling2D, kinds)
            for layer in trunk.layers:
                self.assertIsNone(getattr(layer, "kernel_regularizer", None))
        model(_images(2, 8), training=True)
        self.assertEmpty(model.losses)

    def test_build_is_seeded(self):
        def weights(seed):
            keras.utils.set_random_seed(seed)
            model = backbones.build_backbone(TINY_WRN, 3, (8, 8, 3))
            return [v.numpy() for v in model.variables], model(
                _images(2, 8), training=True)

        first, first_logits = weights(5)
        again, again_logits = weights(5)
        other, _ = weights(6)
        for a, b in zip(first, again):
            self.assertAllEqual(a, b)
        # Dropout masks are seeded too.
        self.assertAllEqual(first_logits, again_logits)
        self.assertNotAllClose(first[0], other[0])

    def test_kaiming_normal_scale(self):
        keras.utils.set_random_seed(0)
        model = backbones.build_backbone(RESNET32, 10, (8, 8, 3))
        kernel = model.trunk.get_layer("stage2_block1_conv1").kernel.numpy()
        fan_in = 3 * 3 * 64
        self.assertAllClose(kernel.std(), np.sqrt(2.0 / fan_in), rtol=0.02)
        # Untruncated: some weights lie beyond two standard deviations.
        self.assertGreater(np.abs(kernel).max(), 3 * np.sqrt(2.0 / fan_in))

    @parameterized.parameters((SMALL_CNN,), (TINY_WRN,))
    def test_stateless_call(self, config):
        model = backbones.build_backbone(config, 3, (8, 8, 3))
        images = _images(4, 8)
        params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
        states = [
            tf.convert_to_tensor(v) for v in model.non_trainable_variables]
        same, new_states = model.stateless_call(params, states, images)
        self.assertAllClose(same, model(images))
        for new, old in zip(new_states, states):
            self.assertAllEqual(new, old)
        moved, _ = model.stateless_call(
            [p + 0.05 for p in params], states, images)
        self.assertNotAllClose(moved, same)
        # training=True: batch statistics, state updates returned, not applied.
        trained, new_states = model.stateless_call(
            params, states, images, training=True)
        self.assertNotAllClose(trained, same)
        for variable, old in zip(model.non_trainable_variables, states):
            self.assertAllEqual(variable, old)
        self.assertNotAllClose(new_states[0], states[0])
        # The same states give the same result (dropout included).
        repeated, _ = model.stateless_call(
            params, states, images, training=True)
        self.assertAllClose(repeated, trained)

    @parameterized.parameters((SMALL_CNN,), (RESNET32,), (TINY_WRN,))
    def test_float64_second_order_matches_finite_differences(self, config):
        with testing.float64():
            keras.utils.set_random_seed(0)
            model = backbones.build_backbone(config, 3, (8, 8, 3))
            self.assertTrue(all(
                v.dtype == "float64" for v in model.trainable_variables))
            images = _images(4, 8, seed=2, dtype="float64")
            self.assertEqual(model(images).dtype, tf.float64)
            error = _hessian_vector_error(
                model, images, tf.constant([0, 1, 2, 1]))
        self.assertLess(error, 1e-6)

    def test_config_round_trip(self):
        model = backbones.build_backbone(SMALL_CNN, 5, (8, 8, 3), name="w1")
        clone = backbones.Classifier.from_config(model.get_config())
        self.assertTrue(clone.built)
        self.assertEqual(clone.name, "w1")
        self.assertEqual(clone.feature_dim, 16)
        self.assertEqual(
            [tuple(v.shape) for v in clone.variables],
            [tuple(v.shape) for v in model.variables])
        path = os.path.join(self.get_temp_dir(), "classifier.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        self.assertIsInstance(loaded, backbones.Classifier)
        images = _images(2, 8)
        self.assertAllClose(loaded(images), model(images))
        self.assertAllClose(loaded.features(images), model.features(images))

    def test_subsample_zero_pad(self):
        images = tf.reshape(tf.range(2 * 5 * 5 * 2, dtype=tf.float32),
                            [2, 5, 5, 2])
        layer = backbones.SubsampleZeroPad(6, 2)
        out = layer(images)
        self.assertEqual(out.shape, (2, 3, 3, 6))
        self.assertEqual(layer.compute_output_shape((None, 5, 5, 2)),
                         (None, 3, 3, 6))
        self.assertAllEqual(out[..., 2:4], images[:, ::2, ::2, :])
        self.assertAllEqual(out[..., :2], tf.zeros([2, 3, 3, 2]))
        self.assertAllEqual(out[..., 4:], tf.zeros([2, 3, 3, 2]))

    def test_bad_choices(self):
        with self.assertRaisesRegex(ValueError,
                                    "backbone='vgg'.*'resnet8', 'resnet20'"):
            backbones.build_backbone(
                config_lib.ModelConfig(backbone="vgg"), 3, (8, 8, 3))
        # Only 8, 20 and 32 are choices, though the trunk takes any 6n + 2.
        with self.assertRaisesRegex(ValueError, "backbone='resnet44'"):
            backbones.build_trunk(
                config_lib.ModelConfig(backbone="resnet44"), (8, 8, 3))
        with self.assertRaisesRegex(ValueError, "backbone"):
            config_lib.ModelConfig(backbone="resnet44").validate()
        with self.assertRaisesRegex(ValueError, "depth=30.*6n\\+2"):
            backbones.cifar_resnet_trunk(30, (8, 8, 3))
        with self.assertRaisesRegex(ValueError, "depth=27.*6n\\+4"):
            backbones.wide_resnet_trunk(27, 2, (8, 8, 3))
        with self.assertRaisesRegex(ValueError, "num_classes=0"):
            backbones.build_backbone(SMALL_CNN, 0, (8, 8, 3))
        with self.assertRaisesRegex(ValueError, "shortcut='C'"):
            backbones.cifar_resnet_trunk(8, (8, 8, 3), shortcut="C")


if __name__ == "__main__":
    tf.test.main()
