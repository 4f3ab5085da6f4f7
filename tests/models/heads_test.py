"""Heads: the cosine head against numpy, its second derivative, its
serialisation and export, and the configurations it refuses."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf

from lfm_tf import config as config_lib
from lfm_tf import export
from lfm_tf import testing
from lfm_tf.data import pipeline
from lfm_tf.models import backbones
from lfm_tf.models import heads

COSINE_CNN = config_lib.ModelConfig(backbone="small_cnn", width=4,
                                    head="cosine", head_scale=5.0)
SIDE = 8


def _np_cosine_logits(features, kernel, scale):
    unit_h = features / np.linalg.norm(features, axis=1, keepdims=True)
    unit_w = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    return scale * unit_h @ unit_w


class CosineHeadTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.enterContext(testing.float64())
        rng = np.random.default_rng(0)
        self.features = rng.normal(size=(5, 7))
        self.head = heads.CosineHead(3, scale=4.0)
        self.head.build((None, 7))

    def test_logits_are_scaled_cosines(self):
        logits = self.head(tf.constant(self.features)).numpy()
        kernel = self.head.kernel.numpy()
        self.assertAllClose(
            logits, _np_cosine_logits(self.features, kernel, 4.0), rtol=1e-12)
        self.assertLessEqual(np.abs(logits).max(), 4.0 + 1e-12)
        # A cosine ignores the feature norm.
        self.assertAllClose(self.head(tf.constant(7.0 * self.features)),
                            logits, rtol=1e-12)
        self.assertEqual(self.head.compute_output_shape((None, 7)), (None, 3))

    def test_zero_features_give_zero_logits_and_finite_gradients(self):
        zeros = tf.zeros([2, 7], tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(zeros)
            logits = self.head(zeros)
        self.assertAllEqual(logits, tf.zeros([2, 3], tf.float64))
        self.assertTrue(np.isfinite(tape.gradient(logits, zeros)).all())

    def test_second_order_through_the_backbone_matches_finite_differences(
            self):
        keras.utils.set_random_seed(0)
        model = backbones.build_backbone(COSINE_CNN, 3, (SIDE, SIDE, 3))
        self.assertIsInstance(model.head, heads.CosineHead)
        params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
        states = [tf.convert_to_tensor(v)
                  for v in model.non_trainable_variables]
        rng = np.random.default_rng(1)
        images = tf.constant(rng.normal(size=(4, SIDE, SIDE, 3)))
        labels = tf.constant([0, 1, 2, 1])
        direction = [tf.constant(rng.normal(size=p.shape)) for p in params]

        def gradient(at):
            with tf.GradientTape() as tape:
                tape.watch(at)
                logits, _ = model.stateless_call(at, states, images,
                                                 training=True)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels, logits))
            return tape.gradient(loss, at)

        with tf.GradientTape() as outer:
            outer.watch(params)
            inner = gradient(params)
            dot = tf.add_n([tf.reduce_sum(g * d)
                            for g, d in zip(inner, direction)])
        hessian_vector = outer.gradient(dot, params)
        h = 1e-5
        plus = gradient([p + h * d for p, d in zip(params, direction)])
        minus = gradient([p - h * d for p, d in zip(params, direction)])
        numeric = [(a - b) / (2 * h) for a, b in zip(plus, minus)]
        error = tf.linalg.global_norm(
            [a - b for a, b in zip(hessian_vector, numeric)])
        self.assertLess(float(error / tf.linalg.global_norm(numeric)), 1e-6)


class CosineClassifierTest(tf.test.TestCase):

    def test_saved_and_loaded_as_a_keras_model(self):
        keras.utils.set_random_seed(0)
        model = backbones.build_backbone(COSINE_CNN, 4, (SIDE, SIDE, 3))
        path = os.path.join(self.get_temp_dir(), "cosine.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        self.assertIsInstance(loaded.head, heads.CosineHead)
        self.assertEqual(loaded.head.scale, 5.0)
        self.assertEqual(loaded.num_classes, 4)
        images = tf.random.stateless_normal([3, SIDE, SIDE, 3], seed=[0, 1])
        self.assertAllClose(loaded(images), model(images))

    def test_export_rebuilds_it_and_serves_its_softmax_in_a_fresh_process(
            self):
        keras.utils.set_random_seed(1)
        model = backbones.build_backbone(COSINE_CNN, 2, (SIDE, SIDE, 3))
        workdir = self.get_temp_dir()
        names = ["zero", "one"]
        preprocessing = pipeline.Preprocessing(SIDE, (0.5,) * 3, (0.25,) * 3)
        model.save_weights(os.path.join(workdir, "classifier.weights.h5"))
        with open(os.path.join(workdir, "export_info.json"), "w") as f:
            json.dump({
                "model_name": "cosine", "class_names": names,
                "input_shape": [SIDE, SIDE, 3],
                "preprocessing": preprocessing.to_dict(),
                "architecture": {"kind": "backbone",
                                 "model": vars(COSINE_CNN)}}, f)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.ExperimentConfig().to_json())
        rebuilt, _ = export.load_classifier(workdir)
        self.assertIsInstance(rebuilt.head, heads.CosineHead)
        pixels = np.random.default_rng(2).integers(
            0, 256, (3, SIDE, SIDE, 3), dtype=np.uint8)
        scaled = pipeline.preprocess(tf.constant(pixels), preprocessing)
        expected = tf.nn.softmax(model(scaled)).numpy()
        self.assertAllClose(tf.nn.softmax(rebuilt(scaled)), expected,
                            atol=1e-6)

        saved = os.path.join(workdir, "saved_model")
        export.write_saved_model(rebuilt, saved, class_names=names,
                                 preprocessing=preprocessing,
                                 input_shape=(SIDE, SIDE, 3))
        inputs = os.path.join(workdir, "in.npy")
        outputs = os.path.join(workdir, "out.npy")
        np.save(inputs, pixels)
        code = (
            "import sys, numpy as np, tensorflow as tf\n"
            "model = tf.saved_model.load(sys.argv[1])\n"
            "out = model.signatures['serving_default'](\n"
            "    images=tf.constant(np.load(sys.argv[2])))\n"
            "np.save(sys.argv[3], out['probabilities'].numpy())\n")
        result = subprocess.run(
            [sys.executable, "-c", code, saved, inputs, outputs],
            capture_output=True, text=True, timeout=300, check=False)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertAllClose(np.load(outputs), expected, atol=1e-5)


class HeadConfigTest(tf.test.TestCase):

    def test_bad_heads_are_refused_with_the_fix(self):
        with self.assertRaisesRegex(ValueError,
                                    "head='arc'.*'dense', 'cosine'"):
            config_lib.ModelConfig(head="arc").validate()
        with self.assertRaisesRegex(ValueError, "head_scale=0"):
            config_lib.ModelConfig(head="cosine", head_scale=0.0).validate()
        with self.assertRaisesRegex(ValueError,
                                    "head='cosine' with genotype='DARTS_V2'"
                                    ".*--head=dense"):
            config_lib.ModelConfig(head="cosine",
                                   genotype="DARTS_V2").validate()
        with self.assertRaisesRegex(ValueError, "scale > 0"):
            heads.CosineHead(3, scale=-1.0)
        with self.assertRaisesRegex(ValueError, "head='arc'"):
            heads.build_head("arc", 3, 30.0, "zeros")

    def test_first_order_lfm_needs_a_dense_head(self):
        config = config_lib.ExperimentConfig().replace(
            head="cosine", method="lfm", hypergradient="first_order")
        with self.assertRaisesRegex(
                ValueError, "head='cosine' with hypergradient='first_order'"
                ".*--hypergradient=exact"):
            config.validate()
        config.replace(hypergradient="exact").validate()


if __name__ == "__main__":
    tf.test.main()
