"""Helpers for tests that check gradients against finite differences."""

import contextlib

import keras


@contextlib.contextmanager
def float64():
    """Builds and runs Keras layers in float64 inside the block.

    Both the floatx and the dtype policy are set: the policy is cached when
    the first layer is built, so floatx alone would not take effect
    (research/tf_stack.md §2). The previous settings are restored after.
    """
    floatx = keras.config.floatx()
    policy = keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def central_difference(objective, variable, position, h=1e-5):
    """(f(v + h e_i) - f(v - h e_i)) / 2h for one entry of a variable.

    Args:
      objective: no-argument callable returning a scalar.
      variable: the Keras / TF variable to perturb (restored afterwards).
      position: flat index of the entry.
      h: step.

    Returns:
      float.
    """
    original = variable.numpy()
    values = original.reshape(-1).copy()
    values[position] += h
    variable.assign(values.reshape(original.shape))
    plus = float(objective())
    values[position] -= 2 * h
    variable.assign(values.reshape(original.shape))
    minus = float(objective())
    variable.assign(original)
    return (plus - minus) / (2 * h)


def tiny_saved_model(model_name, class_names, side=8):
    """Exports an untrained small CNN as `<tmp>/<model_name>/1`, the layout
    TF Serving reads; the serving tests' shared fixture.

    Args:
      model_name: the model's folder name.
      class_names: one name per class.
      side: image side; images are [side, side, 3] uint8.

    Returns:
      The version folder's path.
    """
    # pylint: disable=g-import-not-at-top
    import os
    import tempfile

    from lfm_tf import config as config_lib
    from lfm_tf import export
    from lfm_tf.data import pipeline
    from lfm_tf.models import backbones
    # pylint: enable=g-import-not-at-top

    keras.utils.set_random_seed(0)
    classifier = backbones.build_backbone(
        config_lib.ModelConfig(backbone="small_cnn", width=4),
        len(class_names), (side, side, 3))
    path = os.path.join(tempfile.mkdtemp(), model_name, "1")
    export.write_saved_model(
        classifier, path, class_names=class_names,
        preprocessing=pipeline.Preprocessing(None, (0.5,) * 3, (0.25,) * 3),
        input_shape=(side, side, 3), top_k=2)
    return path
