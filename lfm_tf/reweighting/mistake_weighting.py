"""LFM stage 2 as pure functions: x, z, u, r -> a (DESIGN §1).

    x_ij = softmax_j(sim(V(x_i), V(x_val_j)))       similarity
    z_ij = 1[y_i = y_val_j]                          same_label_mask
    u_j  = CE(f(x_val_j; W1'), y_val_j)              w1_val_losses
    a_i  = sigmoid(sum_j x_ij z_ij u_j r_j / tau)    example_weights_a

With r = 1 every argument is >= 0, so a starts in [0.5, 1): a training
example is up-weighted when validation examples of its class that resemble it
were mispredicted by W1' (lfm_reference §2.1). tau = 1 is the paper;
`class_mean_losses` optionally replaces u_j by its class's mean.
"""

import tensorflow as tf

from lfm_tf import distribute

SIMILARITIES = ("dot", "cosine", "l2")


def similarity(train_embeddings, val_embeddings, metric="dot"):
    """x: row-softmax over validation examples of pairwise similarities.

    Args:
      train_embeddings: float [n_train, d], V of the training batch.
      val_embeddings: float [n_val, d], V of the validation batch.
      metric: `dot` (raw dot product, as the paper), `cosine`, or `l2`
        (negative squared Euclidean distance).

    Returns:
      float [n_train, n_val]; each row sums to 1.

    Raises:
      ValueError: unknown metric.
    """
    if metric == "dot":
        scores = tf.matmul(train_embeddings, val_embeddings, transpose_b=True)
    elif metric == "cosine":
        scores = tf.matmul(
            tf.math.l2_normalize(train_embeddings, axis=1),
            tf.math.l2_normalize(val_embeddings, axis=1),
            transpose_b=True,
        )
    elif metric == "l2":
        sq_train = tf.reduce_sum(tf.square(train_embeddings), 1, keepdims=True)
        sq_val = tf.reduce_sum(tf.square(val_embeddings), 1, keepdims=True)
        cross = tf.matmul(train_embeddings, val_embeddings, transpose_b=True)
        scores = -(sq_train - 2.0 * cross + tf.transpose(sq_val))
    else:
        raise ValueError(
            f"Received similarity metric {metric!r}; expected one of "
            f"{list(SIMILARITIES)}. Set --similarity accordingly."
        )
    return tf.nn.softmax(scores, axis=1)


def same_label_mask(train_labels, val_labels, dtype=tf.float32):
    """z: 1 where a training and a validation example share a label.

    Args:
      train_labels: int [n_train].
      val_labels: int [n_val].
      dtype: output dtype.

    Returns:
      `dtype` [n_train, n_val] of zeros and ones.
    """
    equal = tf.equal(
        tf.cast(train_labels, tf.int64)[:, None],
        tf.cast(val_labels, tf.int64)[None, :],
    )
    return tf.cast(equal, dtype)


def per_example_cross_entropy(labels, logits):
    """CE per example, float [n] (u when evaluated at W1' on validation)."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=logits
    )


def class_mean_losses(w1_val_losses_u, val_labels, num_classes):
    """u_j replaced by the mean of u over the batch's examples of y_j.

    Args:
      w1_val_losses_u: float [n_val].
      val_labels: int [n_val] in [0, num_classes).
      num_classes: C.

    Returns:
      float [n_val]; equal entries within a label.
    """
    labels = tf.cast(val_labels, tf.int32)
    means = tf.math.unsorted_segment_mean(w1_val_losses_u, labels,
                                          num_classes)
    return tf.gather(means, labels)


def example_weights_a(
    similarity_x, same_label_z, w1_val_losses_u, weighting_r,
    use_similarity=True, use_label_mask=True, use_mistakes=True,
    temperature=1.0, centered=False,
):
    """a_i = sigmoid(sum_j x_ij z_ij u_j r_j / tau), with ablations.

    Centred, the sum s_i is taken relative to its mean over the (global)
    batch, a_i = sigmoid((s_i - mean_k s_k) / tau): with r >= 0 the paper's
    s_i >= 0 keeps a in [0.5, 1), at most a factor 2 between examples
    whatever tau; centred, examples below the batch's mean mistake fall
    towards 0 and those above rise towards 1.

    A dropped factor (paper Fig. 4 ablations) is replaced by ones of the same
    shape, so the remaining factors keep their meaning.

    Args:
      similarity_x: float [n_train, n_val].
      same_label_z: float [n_train, n_val].
      w1_val_losses_u: float [n_val].
      weighting_r: float [n_val], r gathered for this validation batch.
      use_similarity: keep x.
      use_label_mask: keep z.
      use_mistakes: keep u.
      temperature: tau > 0 (1.0: the paper).
      centered: subtract the batch mean of s (False: the paper).

    Returns:
      float [n_train] in (0, 1).
    """
    terms = tf.ones_like(similarity_x)
    if use_similarity:
        terms *= similarity_x
    if use_label_mask:
        terms *= same_label_z
    if use_mistakes:
        terms *= w1_val_losses_u[None, :]
    scores = tf.linalg.matvec(terms, weighting_r)
    if centered:
        total, count = distribute.replica_sum([
            tf.reduce_sum(scores), tf.cast(tf.size(scores), scores.dtype)])
        scores -= total / count
    return tf.sigmoid(scores / temperature)


def normalize_weights(weights, mode="none"):
    """`none`: as is; `batch_mean`: w / mean(w) (differentiable).

    Under tf.distribute the mean is over the global batch (every replica's
    slice, by a differentiable all-reduce), so N replicas weight their
    examples as one device weights the whole batch.

    Args:
      weights: float [B], positive; this replica's slice under a strategy.
      mode: `none` or `batch_mean`.

    Returns:
      float [B]; with `batch_mean` its mean over the global batch is 1.
    """
    if mode == "none":
        return weights
    if mode == "batch_mean":
        total, count = distribute.replica_sum([
            tf.reduce_sum(weights),
            tf.cast(tf.size(weights), weights.dtype)])
        return weights / (total / count + 1e-12)
    raise ValueError(
        f"Received weight_normalization={mode!r}; expected none or "
        "batch_mean."
    )
