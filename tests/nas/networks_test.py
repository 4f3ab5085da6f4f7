"""Supernet and derived-network structure: the reference parameter counts
(nas.md §10.2), output shapes, α kept out of the weights."""

import numpy as np
import tensorflow as tf

from lfm_tf.nas import architecture
from lfm_tf.nas import derived_network
from lfm_tf.nas import operations
from lfm_tf.nas import search_network


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


class SupernetTest(tf.test.TestCase):

    def test_parameter_count_matches_reference(self):
        space = search_network.full_space()
        classifier = search_network.build_supernet(
            10, (16, 16, 3), channels=4, cells=3, normal_ops=space,
            reduce_ops=space)
        self.assertEqual(_count(classifier.trainable_variables), 72854)
        self.assertEqual(search_network.reduction_positions(8), (2, 5))

    def test_forward_shapes_and_alpha_outside(self):
        ops = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
        space = search_network.full_space(2, ops)
        classifier = search_network.build_supernet(
            5, (8, 8, 3), channels=4, cells=3, normal_ops=space,
            reduce_ops=space, steps=2)
        arch = architecture.Architecture(space, space, steps=2)
        self.assertEqual(tuple(arch.arch_normal.shape), (5, 4))
        features = classifier.trunk(tf.zeros((2, 8, 8, 3)),
                                    arch_weights=arch.probabilities())
        self.assertEqual(features.shape, (2, classifier.feature_dim))
        ids = {id(v) for v in classifier.trainable_variables}
        self.assertNotIn(id(arch.arch_normal), ids)

    def test_stride_two_ops_halve_the_resolution(self):
        x = tf.random.normal((2, 16, 16, 8))
        for name in operations.PRIMITIVES:
            op = operations.build_op(name, 8, 2, affine=False, search=True)
            self.assertEqual(op(x, training=True).shape, (2, 8, 8, 8), name)


class DerivedNetworkTest(tf.test.TestCase):

    def test_darts_v2_parameter_count_matches_the_paper(self):
        classifier = derived_network.build_derived_classifier(
            "DARTS_V2", 10, (32, 32, 3), channels=36, layers=20,
            auxiliary_weight=0.0)
        # Published ~3.3M; the reference code counts 3,349,342.
        self.assertEqual(_count(classifier.trainable_variables), 3349342)

    def test_auxiliary_logits_only_in_training(self):
        classifier = derived_network.build_derived_classifier(
            "PDARTS", 4, (16, 16, 3), channels=4, layers=3,
            auxiliary_weight=0.4)
        images = tf.random.normal((2, 16, 16, 3))
        logits, auxiliary = classifier.logits_and_auxiliary(images,
                                                            training=True)
        self.assertEqual(logits.shape, (2, 4))
        self.assertEqual(auxiliary.shape, (2, 4))
        self.assertIsNone(
            classifier.logits_and_auxiliary(images, training=False)[1])

    def test_drop_path_zeroes_whole_examples(self):
        layer = derived_network.DropPath(seed=1)
        layer.rate.assign(0.5)
        out = layer(tf.ones((64, 2, 2, 3)), training=True).numpy()
        per_example = out.reshape(64, -1)
        self.assertTrue(np.all((per_example == 0) | (per_example == 2)))
        self.assertTrue(np.all(per_example.min(1) == per_example.max(1)))
        self.assertAllEqual(layer(tf.ones((4, 2, 2, 3))), tf.ones((4, 2, 2, 3)))


if __name__ == "__main__":
    tf.test.main()
