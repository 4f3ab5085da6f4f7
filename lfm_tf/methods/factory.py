"""Builds any reweighting method from an `ExperimentConfig`.

An explicit table from method name to builder; no import-time registration.
"""

import dataclasses
from typing import Optional, Sequence

import keras
import numpy as np

from lfm_tf.methods import base
from lfm_tf.methods import deep_bilevel
from lfm_tf.methods import erm
from lfm_tf.methods import lfm
from lfm_tf.methods import losses
from lfm_tf.methods import molere
from lfm_tf.methods import penalty
from lfm_tf.methods import reweighting_baselines
from lfm_tf.models import backbones
from lfm_tf.models import encoders
from lfm_tf.reweighting import meta_net


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What a method needs to know about the data, not the data itself.

    Attributes:
      num_classes: C.
      input_shape: (H, W, 3) of the preprocessed images.
      num_train: training set size (length of B).
      num_meta: meta set size (length of r when indexed by id).
      class_counts: training examples per observed class, int [C].
      steps_per_epoch: optimizer steps per epoch (for schedules).
    """

    num_classes: int
    input_shape: Sequence[int]
    num_train: int
    num_meta: int
    class_counts: Optional[np.ndarray] = None
    steps_per_epoch: int = 1


def build_method(config, facts: DataFacts) -> base.MethodModel:
    """The method named by `config.method.method`, built and ready to fit.

    Args:
      config: a validated `ExperimentConfig`.
      facts: `DataFacts` of the prepared data.

    Returns:
      A `MethodModel`; compile it with `compile_method`.
    """
    method = config.method.method
    if method not in _BUILDERS:
        raise ValueError(
            f"Received method={method!r}; expected one of {sorted(_BUILDERS)}."
        )
    return _BUILDERS[method](config, facts)


def compile_method(model, config):
    """Compiles with the explicit XLA / eager settings of the config.

    The methods step their own variables, so the Keras optimizer passed here
    only satisfies `compile`; it is never applied.
    """
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        jit_compile=config.train.jit_compile,
        run_eagerly=config.train.run_eagerly,
    )
    return model


def _classifier(config, facts, name):
    return backbones.build_backbone(
        config.model, facts.num_classes, tuple(facts.input_shape), name=name
    )


def _sgd(config, facts, learning_rate, name):
    total = config.train.epochs * (
        config.train.steps_per_epoch or facts.steps_per_epoch
    )
    warmup = config.optimizer.warmup_epochs * facts.steps_per_epoch
    return base.make_sgd(config.optimizer, learning_rate, total, warmup, name)


def training_loss(config, facts, loss=None):
    """The run's per-example training loss (`config.loss`).

    Args:
      config: a validated `ExperimentConfig`.
      facts: `DataFacts`; its class counts feed the prior-based losses and
        DRW.
      loss: overrides `config.loss.loss` (the focal method).

    Returns:
      A `losses.TrainingLoss`.
    """
    spec = config.loss
    drw_start_step = None
    if spec.drw_start_epoch is not None:
        drw_start_step = spec.drw_start_epoch * (
            config.train.steps_per_epoch or facts.steps_per_epoch)
    return losses.TrainingLoss(
        loss or spec.loss, facts.class_counts,
        focal_gamma=config.method.focal_gamma,
        logit_adjust_tau=spec.logit_adjust_tau,
        ldam_max_margin=spec.ldam_max_margin, ldam_scale=spec.ldam_scale,
        ldam_cosine_scale=(config.model.head_scale
                           if config.model.head == "cosine" else None),
        gce_q=spec.gce_q, drw_start_step=drw_start_step,
        drw_beta=spec.drw_beta,
    )


def _common(config, facts, loss=None):
    return dict(
        classifier=_classifier(config, facts, "w1_classifier"),
        sgd=_sgd(config, facts, config.optimizer.w1_learning_rate, "w1_sgd"),
        num_classes=facts.num_classes,
        training_loss=training_loss(config, facts, loss),
    )


def _build_erm(config, facts):
    return erm.ERM(**_common(config, facts))


def _build_focal(config, facts):
    return erm.Focal(**_common(config, facts, loss="focal"))


def _build_class_balanced(config, facts):
    if facts.class_counts is None:
        raise ValueError("The class-balanced loss needs DataFacts.class_counts.")
    return erm.ClassBalanced(
        **_common(config, facts),
        class_counts=facts.class_counts,
        beta=config.method.class_balanced_beta,
    )


def _build_l2rw(config, facts):
    return reweighting_baselines.L2RW(
        **_common(config, facts), method_config=config.method
    )


def _build_mwnet(config, facts):
    return reweighting_baselines.MetaWeightNet(
        **_common(config, facts),
        method_config=config.method,
        meta_net=meta_net.build_meta_net(config.method.meta_net_hidden),
        meta_optimizer=keras.optimizers.Adam(
            config.optimizer.meta_net_learning_rate, name="meta_net_optimizer"
        ),
    )


def _build_dbl(config, facts):
    return deep_bilevel.DeepBilevel(
        **_common(config, facts),
        splits=config.method.dbl_splits,
        mu=config.method.dbl_mu,
        validation=config.method.dbl_validation,
    )


def _build_penalty(config, facts):
    return penalty.Penalty(
        **_common(config, facts),
        num_train=facts.num_train,
        config=config.method,
        weight_decay=config.optimizer.weight_decay,
        steps_per_epoch=config.train.steps_per_epoch or facts.steps_per_epoch,
    )


def _build_molere(config, facts):
    common = _common(config, facts)
    # The trunk's feature width D is the head's input width.
    feature_dim = int(common["classifier"].head.kernel.shape[0])
    return molere.Molere(
        **common,
        meta_net=molere.build_feature_meta_net(
            feature_dim, config.method.meta_net_hidden),
        splitter=molere.build_splitter(
            feature_dim, facts.num_classes,
            config.method.molere_splitter_hidden),
        meta_optimizer=keras.optimizers.Adam(
            config.optimizer.meta_net_learning_rate, name="meta_net_optimizer"),
        splitter_optimizer=keras.optimizers.Adam(
            config.method.molere_splitter_learning_rate,
            name="splitter_optimizer"),
        num_train=facts.num_train,
        config=config.method,
        steps_per_epoch=config.train.steps_per_epoch or facts.steps_per_epoch,
        seed=config.data.seed,
    )


def _build_lfm(config, facts):
    common = _common(config, facts)
    w1 = common["classifier"]
    method = config.method
    if method.single_network:
        w2_trunk, w2_head = w1.trunk, w1.head
    elif method.encoder == "shared":
        w2_trunk = w1.trunk
        w2_head = _classifier(config, facts, "w2_classifier").head
    else:
        w2 = _classifier(config, facts, "w2_classifier")
        w2_trunk, w2_head = w2.trunk, w2.head
    encoder = None
    if method.encoder != "shared":
        encoder = encoders.build_encoder(
            method.encoder, tuple(facts.input_shape), method.encoder_weights
        )
    num_weighting = (
        facts.num_meta if method.weighting_mode == "by_id"
        else config.data.meta_batch_size
    )
    return lfm.LFM(
        **common,
        w2_trunk=w2_trunk,
        w2_head=w2_head,
        w2_sgd=_sgd(config, facts, config.optimizer.w2_learning_rate, "w2_sgd"),
        encoder=encoder,
        num_train=(facts.num_classes
                   if method.example_weight_granularity == "class"
                   else facts.num_train),
        num_weighting=num_weighting,
        config=method,
        optimizer_config=config.optimizer,
        class_counts=facts.class_counts,
    )


_BUILDERS = {
    "erm": _build_erm,
    "focal": _build_focal,
    "class_balanced": _build_class_balanced,
    "l2rw": _build_l2rw,
    "mwnet": _build_mwnet,
    "dbl": _build_dbl,
    "lfm": _build_lfm,
    "penalty": _build_penalty,
    # LRW's second phase is Meta-Weight-Net on the re-split data
    # (lrw.resplit runs first, from train_lib).
    "lrw_easy": _build_mwnet,
    "lrw_random": _build_mwnet,
    "lrw_hard": _build_mwnet,
    "molere": _build_molere,
}
