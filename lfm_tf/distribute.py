"""tf.distribute for every method: the strategy, and replica-consistent steps.

`make_strategy` turns `--strategy` (and `--tpu`, `TF_CONFIG`) into a
`tf.distribute.Strategy`; `train_lib` builds and compiles the method inside
its scope and Keras `fit` runs `train_step` once per replica on a slice of
the global batch.

A multilevel step takes gradients *inside* another tape: W' = W - eta * g
with g = grad of the weighted training loss, then the outer objective is
differentiated through W'. If each replica stepped with its own g, every
replica would differentiate a different W' and the all-reduced hypergradient
would not be the one-device hypergradient (research/tf_stack.md §4). So the
helpers below make each replica compute what one device computes on the
global batch of B examples (b = B / N per replica, N replicas):

* `replica_mean(grads)`: the inner gradients, all-reduced inside the outer
  tape. The mean over replicas of per-replica gradients of the per-replica
  mean loss is the sum over replicas of gradients of the global-batch-scaled
  loss (mean / N), i.e. the gradient of the one-device mean over B. The
  all-reduce is differentiable, so the outer tape sees every replica's
  examples.
* `scale_gradients(grads)`: gradients of an outer objective that every
  replica computes in full (the same value on each) are divided by N,
  because the gradient that flows back through an all-reduce is the sum over
  replicas of their upstream gradients; Keras optimizers then SUM the outer
  gradients over replicas. Scaling the gradients, not the loss, is the same
  (the backward pass is linear) and cannot fall outside a tape.
* `gather_batch(batch)`: the meta batch, all-gathered, so the softmax over
  validation examples, u_j and r_j (by id or positional) cover the whole meta
  batch exactly as on one device.

Every helper is the identity when there is one replica (or outside a replica
context), so single-device runs execute the same ops as before.
"""

import json
import os
from typing import Optional

import tensorflow as tf
from absl import logging

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


def make_strategy(name: str = "default", tpu: Optional[str] = None,
                  devices=None) -> tf.distribute.Strategy:
    """The `tf.distribute.Strategy` named by `--strategy`.

    Args:
      name: `default` (no strategy: TensorFlow's default, one device),
        `one_device` (the first GPU, else the CPU), `mirrored` (every local
        GPU, or `devices`), `multi_worker` (MultiWorkerMirroredStrategy; the
        cluster comes from the `TF_CONFIG` environment variable as TensorFlow
        defines it) or `tpu` (TPUStrategy on `tpu`).
      tpu: TPU name or address for `tpu` (`""` or None: the local TPU, e.g.
        a TPU VM).
      devices: optional device list for `mirrored` (tests use logical CPUs).

    Returns:
      The strategy; enter `strategy.scope()` to build the model.

    Raises:
      ValueError: an unknown name, or `multi_worker` without a valid
        `TF_CONFIG`.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Received strategy={name!r}; expected one of {list(STRATEGIES)}. "
            "Set --strategy to one of these."
        )
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(
            gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu or "")
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _check_tf_config():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError(
            "Received strategy='multi_worker' without TF_CONFIG; expected the "
            "environment variable TF_CONFIG='{\"cluster\": {\"worker\": "
            "[\"host1:port\", ...]}, \"task\": {\"type\": \"worker\", "
            "\"index\": 0}}' on every worker. Set it, or use "
            "--strategy=mirrored on one host."
        )
    try:
        config = json.loads(raw)
        workers = config["cluster"]["worker"]
        task = config["task"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"Received TF_CONFIG={raw!r}; expected JSON with cluster.worker "
            "(a list of host:port) and task.type/task.index. Fix TF_CONFIG."
        ) from error
    logging.info("multi_worker: %d workers, this is %s %s", len(workers),
                 task.get("type"), task.get("index"))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one worker that writes artefacts (always, on one host)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type is None or task_type == "chief" or (
        task_type == "worker" and task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


def _replica_context():
    """The replica context when there is more than one replica, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def num_replicas() -> int:
    """N, the replicas in sync (1 without a strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_mean(values):
    """Mean over replicas of a list of tensors (None entries stay None).

    Called on inner gradients inside the outer tape; differentiable.
    IndexedSlices are densified first, as the all-reduce needs dense values.

    Args:
      values: list of tensors or None.

    Returns:
      List shaped like `values`; `values` itself with one replica.
    """
    return _all_reduce(values, tf.distribute.ReduceOp.MEAN)


def replica_sum(values):
    """Sum over replicas of a list of tensors (None entries stay None)."""
    return _all_reduce(values, tf.distribute.ReduceOp.SUM)


def _all_reduce(values, op):
    context = _replica_context()
    if context is None:
        return values
    values = list(values)
    present = [i for i, v in enumerate(values) if v is not None]
    if not present:
        return values
    reduced = context.all_reduce(
        op, [tf.convert_to_tensor(values[i]) for i in present])
    out = list(values)
    for i, value in zip(present, reduced):
        out[i] = value
    return out


def replica_id():
    """This replica's index in its sync group (0 without a strategy); a
    tensor under a strategy."""
    context = tf.distribute.get_replica_context()
    return 0 if context is None else context.replica_id_in_sync_group


def broadcast(values, source=0):
    """Replica `source`'s values on every replica (None entries stay None).

    An all-reduce of the source's values and zeros elsewhere (differentiable;
    the identity with one replica).

    Args:
      values: list of tensors or None, shaped alike on every replica.
      source: the replica whose values are kept.

    Returns:
      List shaped like `values`.
    """
    context = _replica_context()
    if context is None or not values:
        return values
    keep = tf.equal(context.replica_id_in_sync_group, source)
    # tf.where, not a 0/1 product: an inf or nan elsewhere must not leak.
    return replica_sum([
        None if v is None else tf.where(keep, v, tf.zeros_like(v))
        for v in values])


def scale_gradients(grads):
    """grads / N, for gradients of an objective every replica computes in full.

    Keras optimizers sum gradients over replicas, and the gradient through an
    all-reduce sums the replicas' upstream gradients; dividing by N makes
    both sums add up to the one-device gradient. (The global-batch loss
    scaling, applied after the backward pass, where it cannot fall outside a
    tape.)

    Args:
      grads: list of tensors or None.

    Returns:
      List shaped like `grads`; `grads` itself with one replica.
    """
    context = _replica_context()
    if context is None:
        return grads
    scale = 1.0 / num_replicas()
    return [None if g is None else tf.convert_to_tensor(g) * tf.cast(
        scale, g.dtype) for g in grads]


def clip_by_global_norm(grads, clip_norm):
    """This replica's share of the gradient, clipped as one device clips it.

    Keras optimizers' `global_clipnorm` clips each replica's share before
    they sum it over replicas, so N replicas would not step as one device
    once the norm exceeds the clip. Here the shares are summed, the sum is
    clipped, and each replica gets 1/N of it back for the optimizer's sum.

    Args:
      grads: list of tensors, this replica's shares (they add up to the
        one-device gradient).
      clip_norm: the largest global norm, or None for no clipping.

    Returns:
      List shaped like `grads`; with one replica, `grads` clipped.
    """
    if not clip_norm:
        return grads
    total = replica_sum([tf.convert_to_tensor(g) for g in grads])
    clipped, _ = tf.clip_by_global_norm(total, clip_norm)
    return scale_gradients(clipped)


def gather_batch(batch):
    """Every replica's slice of a (nested dict) batch, concatenated.

    Replica order is the order of the global batch, so positional r and the
    softmax over validation examples see the one-device batch.
    """
    context = _replica_context()
    if context is None:
        return batch
    replicas = context.num_replicas_in_sync
    # Each replica writes its slice into its own row of a zero buffer and the
    # rows are summed: an all-gather built from an all-reduce, because
    # `ReplicaContext.all_gather` fails under MultiWorkerMirroredStrategy
    # ("destinations can not be empty", TF 2.21).
    row = tf.one_hot(context.replica_id_in_sync_group, replicas)

    def gather(value):
        value = tf.convert_to_tensor(value)
        mask = tf.reshape(tf.cast(row, value.dtype),
                          [replicas] + [1] * value.shape.rank)
        rows = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                  mask * value[None])
        return tf.reshape(rows, tf.concat(
            [[-1], tf.shape(value)[1:]], axis=0))

    return tf.nest.map_structure(gather, batch)


def assign_replica_mean(variables):
    """Assigns each variable its mean over replicas (in a replica context).

    For state that every replica updates from its own slice of the batch
    (BatchNorm moving statistics); a no-op with one replica.
    """
    context = _replica_context()
    if context is None or not variables:
        return
    # tf.identity: a variable read under MultiWorkerMirroredStrategy has no
    # device, and the all-reduce needs one (the replica's, from its scope).
    for variable, value in zip(variables, replica_mean(
            [tf.identity(v) for v in variables])):
        variable.assign(value)


def worker_id(strategy: tf.distribute.Strategy) -> int:
    """This worker's task index (0 on one host)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0) if resolver else 0


def artefact_dir(workdir: str, strategy: tf.distribute.Strategy) -> str:
    """Where this worker writes its artefacts (config, metrics, exports, logs).

    The chief writes into `workdir`. Every other worker runs the same code
    (reading mirrored variables may need all of them) but writes its copy
    into `workdir/workers/worker-<id>`, so workers that share a file system
    never write the same file; the copies are the chief's, useful only to
    check that the workers agree. Checkpoints are `checkpointing.Manager`'s
    concern and stay under `workdir`.
    """
    if is_chief(strategy):
        return workdir
    return os.path.join(workdir, "workers", f"worker-{worker_id(strategy)}")


def step_logs(logs):
    """A step's scalar logs, shaped for Keras' cross-replica reduction.

    Under MultiWorkerMirroredStrategy Keras 3.15 reduces train/test logs
    with `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars;
    there each log is returned as shape [1] (the reduction gives back a
    scalar). Elsewhere the logs are returned unchanged.
    """
    strategy = tf.distribute.get_strategy()
    if (_replica_context() is None or not isinstance(
            strategy, tf.distribute.MultiWorkerMirroredStrategy)):
        return logs
    return {name: tf.reshape(value, [1]) for name, value in logs.items()}
