"""Meta-Weight-Net's weighting function: loss value -> weight in (0, 1)."""

import keras


def build_meta_net(hidden_units=100, name="meta_net"):
    """MLP 1 -> hidden (ReLU) -> 1 (sigmoid), as in Shu et al. 2019.

    Args:
      hidden_units: width of the hidden layer.
      name: model name.

    Returns:
      A built `keras.Sequential` mapping float [B, 1] losses to [B, 1]
      weights. Under a mixed-precision policy it computes in the variables'
      dtype (float32): its input is a float32 loss and its weights multiply
      float32 losses. Otherwise it follows the policy (float64 in tests).
    """
    policy = keras.config.dtype_policy()
    dtype = (policy.variable_dtype
             if policy.compute_dtype != policy.variable_dtype else None)
    net = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(hidden_units, activation="relu", dtype=dtype),
            keras.layers.Dense(1, activation="sigmoid", dtype=dtype),
        ],
        name=name,
    )
    return net
