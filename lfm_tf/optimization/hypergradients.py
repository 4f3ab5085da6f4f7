"""Mixed second derivatives through one unrolled weighted step.

Every level of LFM (and L2RW, MW-Net) has the shape

    W'(c) = W - eta * (grad_W mean_i(c_i * l_i(W)) + ...)

where c are per-example weights (B for W1, a for W2). By the chain rule, the
validation loss L(W') changes with c_i as

    dL/dc_i = -eta/n * <grad_W l_i(W), v>,   v = dL/dW'.

The mixed term <grad_W l_i(W), v> is the directional derivative of the
per-example loss vector l(W) along v. Three ways to get it, one interface:

* `exact`: reverse-over-reverse with nested tapes (differentiate
  <grad_W mean(c * l), v> w.r.t. c);
* `finite_difference`: DARTS' central difference
  (l(W + eps v) - l(W - eps v)) / (2 eps), eps = 0.01 / |v|;
* `forward`: one forward-mode JVP (`tf.autodiff.ForwardAccumulator`),
  exact and about the cost of one extra forward pass.

For a dense softmax head z = h K + c the per-example gradient has a closed
form, (p_i - e_yi) h_i^T, so the mixed term over the head alone costs nothing
beyond the forward pass (`dense_head_directional_derivative`).

Where a step starts from another step's result (W2 from W1' under parameter
sharing and single network), the chain also needs a Hessian-vector product
H u of the step's training loss: `hessian_vector_product`
(forward-over-backward) or, for the dense head, the closed form
`dense_head_hessian_vector_product`.
"""

from typing import Callable, List, Sequence

import tensorflow as tf

DIRECTIONAL_METHODS = ("exact", "finite_difference", "forward")


def global_norm(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """sqrt(sum of squares) over a list of tensors (scalar)."""
    return tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors]))


def directional_derivative(
    loss_vector_fn: Callable[[Sequence[tf.Tensor]], tf.Tensor],
    params: Sequence[tf.Tensor],
    direction: Sequence[tf.Tensor],
    method: str = "forward",
    fd_epsilon: float = 0.01,
    unit_direction: bool = False,
) -> tf.Tensor:
    """<grad_W l_i(W), v> for every example i.

    Args:
      loss_vector_fn: maps a list of weight tensors W to per-example losses
        float [n]. Must be a pure function of W (e.g. `stateless_call`).
      params: W, the point of evaluation.
      direction: v, same structure as `params`.
      method: `exact`, `finite_difference` or `forward`.
      fd_epsilon: finite-difference step scale; eps = fd_epsilon / |v|.
      unit_direction: evaluate along v / |v| and multiply by |v| in float32
        (the term is linear in v). Used under float16 compute: `forward`'s
        tangents and `exact`'s second-order adjoints then have a fixed size
        whatever |v|, so they neither underflow (a small late-training v)
        nor overflow (v times the loss scale did, at 2^15).
        `finite_difference` is scale-free already (eps v has norm
        fd_epsilon).

    Returns:
      float [n].

    Raises:
      ValueError: unknown method.
    """
    params = [tf.convert_to_tensor(p) for p in params]
    direction = [tf.convert_to_tensor(v) for v in direction]
    if unit_direction and method != "finite_difference":
        norm = global_norm(direction)
        # v = 0 gives 0, as the unnormalised term would.
        inverse = tf.math.divide_no_nan(tf.ones_like(norm), norm)
        return _directional(
            loss_vector_fn, params, [inverse * v for v in direction], method,
            fd_epsilon) * norm
    return _directional(loss_vector_fn, params, direction, method,
                        fd_epsilon)


def _directional(loss_vector_fn, params, direction, method, fd_epsilon):
    """`directional_derivative` without loss scaling; see there."""
    if method == "forward":
        with tf.autodiff.ForwardAccumulator(params, direction) as acc:
            losses = loss_vector_fn(params)
        return acc.jvp(losses, unconnected_gradients="zero")
    if method == "finite_difference":
        eps = fd_epsilon / (global_norm(direction) + 1e-12)
        eps = tf.cast(eps, params[0].dtype)
        plus = loss_vector_fn([p + eps * v for p, v in zip(params, direction)])
        minus = loss_vector_fn([p - eps * v for p, v in zip(params, direction)])
        return (plus - minus) / (2.0 * eps)
    if method == "exact":
        # d/dc <grad_W sum_i c_i l_i, v> at c = 1 equals <grad_W l_i, v>.
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(params)
                losses = loss_vector_fn(params)
                ones = tf.ones_like(losses)
                outer.watch(ones)
                weighted = tf.reduce_sum(ones * losses)
            grads = inner.gradient(weighted, params)
            inner_product = tf.add_n(
                [tf.reduce_sum(g * v) for g, v in zip(grads, direction)
                 if g is not None]
            )
        return outer.gradient(inner_product, ones)
    raise ValueError(
        f"Received directional derivative method {method!r}; expected one of "
        f"{list(DIRECTIONAL_METHODS)}."
    )


def dense_head_directional_derivative(features, logits, labels, direction):
    """<grad_head CE_i, v> for a dense head, in closed form.

    With z_i = h_i K + c and l_i = CE(z_i, y_i): grad_K l_i = h_i^T (p_i -
    e_yi) and grad_c l_i = p_i - e_yi, so <grad l_i, (v_K, v_c)> =
    (h_i v_K + v_c) . (p_i - e_yi).

    Args:
      features: float [B, D], the head's input h.
      logits: float [B, C], z.
      labels: int [B].
      direction: [v_K float [D, C], v_c float [C]].

    Returns:
      float [B].
    """
    v_kernel, v_bias = direction
    residual = tf.nn.softmax(logits) - tf.one_hot(
        tf.cast(labels, tf.int32), tf.shape(logits)[1], dtype=logits.dtype)
    projected = tf.matmul(features, v_kernel) + v_bias
    return tf.reduce_sum(projected * residual, axis=1)


def hessian_vector_product(
    gradient_fn: Callable[[Sequence[tf.Tensor]], Sequence[tf.Tensor]],
    params: Sequence[tf.Tensor],
    direction: Sequence[tf.Tensor],
) -> List[tf.Tensor]:
    """H u by forward-over-backward: the JVP of the gradient along u.

    Not a central difference of gradients: ReLU makes the gradient jump at
    every kink a perturbation crosses, and the jump divided by 2 eps does
    not shrink with eps (on the tests' tiny CNN, with DARTS' eps, B's
    hypergradient under PS and single network was 25-810 % wrong that way,
    3-14 % with this). It is evaluated along u / |u| and scaled back, so
    the tangents have a fixed size whatever |u| (float16).

    Args:
      gradient_fn: maps weight tensors W to the gradient of one scalar loss,
        a list shaped like W (None entries are zero). Must be a pure
        function of W.
      params: W.
      direction: u, shaped like `params`.

    Returns:
      list shaped like `params`.
    """
    params = [tf.convert_to_tensor(p) for p in params]
    direction = [tf.convert_to_tensor(u) for u in direction]
    norm = global_norm(direction)
    inverse = tf.math.divide_no_nan(tf.ones_like(norm), norm)
    with tf.autodiff.ForwardAccumulator(
            params, [inverse * u for u in direction]) as acc:
        grads = gradient_fn(params)
    grads = [tf.zeros_like(p) if g is None else g
             for p, g in zip(params, grads)]
    return [tf.cast(norm, t.dtype) * t for t in acc.jvp(
        grads, unconnected_gradients="zero")]


def dense_head_hessian_vector_product(features, logits, weights,
                                      direction):
    """H u of mean_i(w_i CE(h_i K + c, y_i)) w.r.t. (K, c), in closed form.

    With p_i = softmax(z_i) and dz_i = h_i u_K + u_c, the gradient's
    derivative along u is dp_i = p_i * dz_i - p_i <p_i, dz_i>, so
    H u = (mean_i w_i h_i^T dp_i, mean_i w_i dp_i). The features h are
    held fixed (the trunk does not move).

    Args:
      features: float [B, D], h.
      logits: float [B, C], z.
      weights: float [B], w.
      direction: [u_K float [D, C], u_c float [C]].

    Returns:
      [H_K u float [D, C], H_c u float [C]].
    """
    u_kernel, u_bias = direction
    probabilities = tf.nn.softmax(logits)
    d_logits = tf.matmul(features, u_kernel) + u_bias
    d_probabilities = probabilities * (
        d_logits - tf.reduce_sum(probabilities * d_logits, axis=1,
                                 keepdims=True))
    weighted = tf.cast(weights, logits.dtype)[:, None] * d_probabilities
    count = tf.cast(tf.shape(logits)[0], logits.dtype)
    return [tf.matmul(features, weighted, transpose_a=True) / count,
            tf.reduce_sum(weighted, axis=0) / count]


def weight_hypergradient(directional, step_scale, num_examples):
    """dL/dc_i from the mixed term, for W' = W - step_scale * mean(c * l)'.

    Args:
      directional: float [n], <grad_W l_i(W), dL/dW'>.
      step_scale: scalar, the learning rate (times 1 + momentum for
        Nesterov); see `FunctionalSGD.step_scale`.
      num_examples: n of the mean in the weighted loss.

    Returns:
      float [n].
    """
    scale = tf.cast(step_scale, directional.dtype) / tf.cast(
        num_examples, directional.dtype
    )
    return -scale * directional
