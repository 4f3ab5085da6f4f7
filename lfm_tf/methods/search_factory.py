"""Builds the architecture-search methods (DARTS, LFM-DARTS) for one stage.

DARTS has one stage; P-DARTS runs several, each a fresh supernet of its own
depth and candidate ops (research/nas.md §5.2), so the builder takes the
stage explicitly.
"""

import dataclasses
from typing import Optional, Sequence

import keras

from lfm_tf.methods import base
from lfm_tf.methods import darts
from lfm_tf.methods import lfm_darts
from lfm_tf.models import encoders
from lfm_tf.nas import architecture as architecture_lib
from lfm_tf.nas import search_network


@dataclasses.dataclass(frozen=True)
class SearchStage:
    """One supernet of a search.

    Attributes:
      cells: number of cells.
      normal_ops / reduce_ops: per edge, its candidate op names.
      skip_dropout: P-DARTS' skip-connect dropout rate at the stage start
        (0: none built).
      index: stage number (0 for DARTS).
    """

    cells: int
    normal_ops: Sequence[Sequence[str]]
    reduce_ops: Sequence[Sequence[str]]
    skip_dropout: float = 0.0
    index: int = 0


def first_stage(config) -> SearchStage:
    """The full space at the first stage's depth."""
    search = config.search
    space = search_network.full_space(search.search_steps, search.primitives)
    cells, _, rate = search.stages[0]
    return SearchStage(cells, space, space, rate, 0)


def _sgd(config, facts, learning_rate, name):
    epochs = config.train.epochs
    total = epochs * (config.train.steps_per_epoch or facts.steps_per_epoch)
    return base.make_sgd(config.optimizer, learning_rate, total, 0, name)


def _supernet(config, facts, stage, name):
    search = config.search
    return search_network.build_supernet(
        facts.num_classes, facts.input_shape,
        channels=search.search_channels, cells=stage.cells,
        normal_ops=stage.normal_ops, reduce_ops=stage.reduce_ops,
        steps=search.search_steps, skip_dropout=stage.skip_dropout > 0,
        seed=config.data.seed, name=name)


def build_search_method(config, facts, stage: Optional[SearchStage] = None):
    """`Darts` or `LFMDarts` for `stage` (default: the first), compiled.

    Args:
      config: a validated `ExperimentConfig` with `method` in
        `SEARCH_METHODS`.
      facts: `factory.DataFacts` of the prepared data.
      stage: the supernet to build.
    """
    stage = stage or first_stage(config)
    method = config.method
    architecture = architecture_lib.Architecture(
        stage.normal_ops, stage.reduce_ops, config.search.search_steps,
        config.search.arch_init_scale, seed=config.data.seed + stage.index,
        name="architecture")
    w1 = _supernet(config, facts, stage, "w1_supernet")
    sgd = _sgd(config, facts, config.optimizer.w1_learning_rate, "w1_sgd")
    if method.method == "darts":
        model = darts.Darts(
            w1, sgd, facts.num_classes, architecture=architecture,
            search_config=config.search,
            hypergradient=method.hypergradient)
    elif method.method == "lfm_darts":
        model = _build_lfm_darts(config, facts, stage, w1, sgd, architecture)
    else:
        raise ValueError(
            f"Received method={method.method!r} for a search; expected "
            "`darts` or `lfm_darts`. Train other methods with "
            "`python -m pipelines.train`."
        )
    model.compile(optimizer=keras.optimizers.SGD(0.0),
                  jit_compile=config.train.jit_compile,
                  run_eagerly=config.train.run_eagerly)
    return model


def float32_outputs(model):
    """Logits and V's embeddings in float32 under mixed precision.

    The search counterpart of `train_lib._float32_outputs`: a supernet's
    features already come out in the variables' dtype (`SearchNetwork.call`),
    so the heads and V's last layer are what is left to compute in float32;
    u, a, the similarities and every loss are then float32.

    Args:
      model: a `Darts` or `LFMDarts` built under a mixed-precision policy.
    """
    model.classifier.head.dtype_policy = "float32"
    w2_head = getattr(model, "w2_head", None)
    if w2_head is not None:
        w2_head.dtype_policy = "float32"
    encoder = getattr(model, "encoder", None)
    if encoder is not None:
        encoder.layers[-1].dtype_policy = "float32"


def _build_lfm_darts(config, facts, stage, w1, sgd, architecture):
    method = config.method
    if method.encoder == "shared":
        w2_trunk = w1.trunk
        w2_head = keras.layers.Dense(facts.num_classes, name="w2_head")
        w2_head.build((None, w1.feature_dim))
    else:
        w2 = _supernet(config, facts, stage, "w2_supernet")
        w2_trunk, w2_head = w2.trunk, w2.head
    encoder = None
    if method.encoder != "shared":
        encoder = encoders.build_encoder(
            method.encoder, tuple(facts.input_shape), method.encoder_weights)
    num_weighting = (facts.num_meta if method.weighting_mode == "by_id"
                     else config.data.meta_batch_size)
    return lfm_darts.LFMDarts(
        w1, sgd, facts.num_classes,
        w2_trunk=w2_trunk, w2_head=w2_head,
        w2_sgd=_sgd(config, facts, config.optimizer.w2_learning_rate,
                    "w2_sgd"),
        encoder=encoder, num_weighting=num_weighting, config=method,
        optimizer_config=config.optimizer, architecture=architecture,
        search_config=config.search)
