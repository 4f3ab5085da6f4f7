"""Frozen experiment configuration: the one home of every default.

Each field name doubles as the absl flag of the same name (see
`pipelines/flags.py`), so field names are unique across the dataclasses below.
Names follow DESIGN §4: `w1_` (W1), `w2_` (W2), `encoder_` (V), `weighting_`
(r), `example_weight_` (B), `arch_` (α).
"""

import dataclasses
import json
from typing import Optional, Tuple

SOURCES = ("digits", "folder", "tfds", "arrays")
NOISE_TYPES = ("none", "uniform", "flip", "flip2")
BACKBONES = ("small_cnn", "resnet8", "resnet20", "resnet32", "wrn28_10")
HEADS = ("dense", "cosine")
ENCODERS = ("small_cnn", "resnet18", "shared")
SIMILARITIES = ("dot", "cosine", "l2")
HYPERGRADIENTS = ("exact", "finite_difference", "first_order")
WEIGHTING_MODES = ("by_id", "positional")
EVALUATED_LEARNERS = ("w1", "w2", "ensemble")
LFM_OBJECTIVES = ("paper", "shared", "both")
MISTAKE_WEIGHTINGS = ("learned", "none")
MISTAKE_SIGNALS = ("example", "class")
EXAMPLE_WEIGHT_GRANULARITIES = ("example", "class")
WEIGHT_NORMALIZATIONS = ("none", "batch_mean")
LOSSES = ("ce", "focal", "logit_adjusted", "balanced_softmax", "ldam", "gce")
# The methods whose every learner step takes its per-example loss from
# `methods.losses.TrainingLoss` (the others compute CE themselves).
LOSS_METHODS = ("erm", "focal", "class_balanced", "l2rw", "mwnet", "lfm",
                "lrw_easy", "lrw_random", "lrw_hard")
METHODS = ("erm", "focal", "class_balanced", "l2rw", "mwnet", "dbl", "lfm",
           "penalty", "lrw_easy", "lrw_random", "lrw_hard", "molere",
           "darts", "lfm_darts")
DBL_VALIDATION = ("train_split", "meta")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
MIXED_PRECISION = ("none", "mixed_bfloat16", "mixed_float16")
# Architecture search: the methods whose B is the architecture α.
SEARCH_METHODS = ("darts", "lfm_darts")
ARCH_ORDERS = ("first", "second")
PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
LR_SCHEDULES = ("constant", "cosine")
# Every choice-valued field and its choices: validate() checks them and
# pipelines/flags.py defines each as an enum flag (`--helpfull` lists the
# choices). A new choice field needs its tuple above and an entry here.
CHOICES = {
    "source": SOURCES,
    "noise_type": NOISE_TYPES,
    "backbone": BACKBONES,
    "head": HEADS,
    "lr_schedule": LR_SCHEDULES,
    "method": METHODS,
    "hypergradient": HYPERGRADIENTS,
    "encoder": ENCODERS,
    "similarity": SIMILARITIES,
    "weighting_mode": WEIGHTING_MODES,
    "evaluate_learner": EVALUATED_LEARNERS,
    "lfm_objective": LFM_OBJECTIVES,
    "mistake_weighting": MISTAKE_WEIGHTINGS,
    "mistake_signal": MISTAKE_SIGNALS,
    "example_weight_granularity": EXAMPLE_WEIGHT_GRANULARITIES,
    "weight_normalization": WEIGHT_NORMALIZATIONS,
    "example_weight_normalization": WEIGHT_NORMALIZATIONS,
    "loss": LOSSES,
    "dbl_validation": DBL_VALIDATION,
    "arch_order": ARCH_ORDERS,
    "strategy": STRATEGIES,
    "mixed_precision": MIXED_PRECISION,
}
# numpy's legacy seeding (keras.utils.set_random_seed) takes [0, 2**32).
MAX_SEED = 2**32 - 1


def parse_list(name, text, kind=float):
    """A comma-separated flag value as a tuple (empty text: empty tuple)."""
    try:
        return tuple(kind(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(
            f"Received {name}={text!r}; expected comma-separated "
            f"{kind.__name__} values, e.g. --{name}=0,6,12."
        ) from None


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"Received {name}={value!r}; expected one of {list(choices)}. "
            f"Set --{name} to one of these."
        )


def _check_positive(name, value, allow_zero=False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"Received {name}={value!r}; expected a number {bound}. "
            f"Set --{name} to a value {bound}."
        )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split and corrupted.

    Attributes:
      source: `digits` (scikit-learn's embedded 8x8 digits, the default),
        `folder` (class folders or a `.tar.gz` of them at `data_path`), `tfds`
        (a TFDS image-classification data set named `tfds_name`), or `arrays`
        (numpy arrays handed over in code).
      data_path: folder or `.tar.gz` archive for `source=folder`.
      tfds_name: TFDS data set name for `source=tfds`, e.g. `cifar10`.
      data_dir: TFDS data directory (never downloaded to in tests).
      cache_dir: where archives are extracted, keyed by their sha256.
      image_size: side length images are resized to; None keeps the native
        size.
      num_meta_per_class: clean, balanced meta (validation) examples per class,
        drawn before any corruption and never overlapping training data.
      imbalance_factor: IF >= 1 of the long tail n_c = n_max * IF^(-c/(C-1));
        1 means balanced.
      max_train_per_class: n_max cap before the long tail (CPU-size runs).
      noise_type: `none`, `uniform`, `flip` or `flip2` label noise.
      noise_rate: probability in [0, 1) that a training label is corrupted.
      test_fraction: held-out test share for sources without a test split.
      max_test_examples: optional cap on the test set (CPU-size runs).
      batch_size: training batch size (fixed shapes: drop_remainder).
      meta_batch_size: meta (validation) batch size.
      augment: random crop with padding and horizontal flip on training data.
      flip: the horizontal flip of `augment` (turn it off for data whose
        classes are not mirror-symmetric, such as digits).
      crop_padding: padding of the random crop, in pixels.
      cutout: side of the cutout square; 0 disables it.
      seed: seed of every split and of the augmentation.
    """

    source: str = "digits"
    data_path: Optional[str] = None
    tfds_name: Optional[str] = None
    data_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    image_size: Optional[int] = None
    num_meta_per_class: int = 10
    imbalance_factor: float = 1.0
    max_train_per_class: Optional[int] = None
    noise_type: str = "none"
    noise_rate: float = 0.0
    test_fraction: float = 0.2
    max_test_examples: Optional[int] = None
    batch_size: int = 100
    meta_batch_size: int = 100
    augment: bool = True
    flip: bool = True
    crop_padding: int = 4
    cutout: int = 0
    seed: int = 0

    def validate(self):
        _check_choice("source", self.source, SOURCES)
        _check_choice("noise_type", self.noise_type, NOISE_TYPES)
        if self.source == "folder" and not self.data_path:
            raise ValueError(
                "Received source='folder' without data_path; expected a folder "
                "or .tar.gz of class folders. Set --data_path=/path/to/data."
            )
        if self.source == "tfds" and not self.tfds_name:
            raise ValueError(
                "Received source='tfds' without tfds_name; expected a TFDS "
                "image-classification name. Set --tfds_name=cifar10."
            )
        # A path or name the chosen source never reads is almost always a
        # forgotten --source; training on other data than meant is worse
        # than an error.
        if self.data_path and self.source != "folder":
            raise ValueError(
                f"Received data_path={self.data_path!r} with source="
                f"{self.source!r}, which does not read it; expected data_path "
                "only with source='folder'. Set --source=folder to train on "
                "it, or drop --data_path (--data_path= clears one set in a "
                "flagfile)."
            )
        if self.tfds_name and self.source != "tfds":
            raise ValueError(
                f"Received tfds_name={self.tfds_name!r} with source="
                f"{self.source!r}, which does not read it; expected tfds_name "
                "only with source='tfds'. Set --source=tfds to train on it, "
                "or drop --tfds_name (--tfds_name= clears one set in a "
                "flagfile)."
            )
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(
                f"Received seed={self.seed}; expected an integer in "
                f"[0, {MAX_SEED}] (numpy's seed range). Set --seed=0 or "
                "another non-negative integer."
            )
        if self.imbalance_factor < 1:
            raise ValueError(
                f"Received imbalance_factor={self.imbalance_factor}; expected "
                ">= 1 (n_max / n_min). Use 100 for 'imbalance 100', not 0.01."
            )
        if not 0 <= self.noise_rate < 1:
            raise ValueError(
                f"Received noise_rate={self.noise_rate}; expected a value in "
                "[0, 1). Set --noise_rate=0.4 for 40% noise."
            )
        if self.noise_type == "none" and self.noise_rate > 0:
            raise ValueError(
                f"Received noise_rate={self.noise_rate} with noise_type='none';"
                " set --noise_type=uniform|flip|flip2 or --noise_rate=0."
            )
        if not 0 < self.test_fraction < 1:
            raise ValueError(
                f"Received test_fraction={self.test_fraction}; expected a "
                "value in (0, 1)."
            )
        for name in ("num_meta_per_class", "batch_size", "meta_batch_size"):
            _check_positive(name, getattr(self, name))
        for name in ("image_size", "max_train_per_class", "max_test_examples"):
            _check_positive(name, getattr(self, name))
        _check_positive("crop_padding", self.crop_padding, allow_zero=True)
        _check_positive("cutout", self.cutout, allow_zero=True)
        return self


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The classifier backbone (W1 and W2 share the architecture).

    Attributes:
      backbone: `small_cnn`, `resnet8`, `resnet20`, `resnet32` (the CIFAR
        ResNets of depth 8, 20, 32) or `wrn28_10`.
      width: base channel count of `small_cnn`; widen factor of WRN.
      depth: depth of WRN (28 for WRN-28-10).
      dropout: dropout rate inside WRN blocks.
      head: `dense` (z = h W + b) or `cosine` (z = s cos(h, W_c), the
        normalised head LDAM is defined on; `models/heads.py`).
      head_scale: the cosine head's fixed logit scale s (LDAM's 30).
      genotype: train the network of a searched cell instead of `backbone`:
        a published name (`DARTS_V2`, `DARTS_V1`, `PDARTS`), a search's
        `genotype.json` (or its workdir). `width` is then its initial
        channels (36 in the DARTS protocol).
      cells: cells of the genotype's network (20 in the DARTS protocol).
      auxiliary_weight: weight of the auxiliary head's CE (0.4; 0 = none).
      drop_path_rate: final drop-path rate, ramped linearly from 0 over the
        epochs (DARTS 0.2, P-DARTS 0.3).
    """

    backbone: str = "resnet32"
    width: int = 16
    depth: int = 28
    dropout: float = 0.0
    head: str = "dense"
    head_scale: float = 30.0
    genotype: Optional[str] = None
    cells: int = 20
    auxiliary_weight: float = 0.4
    drop_path_rate: float = 0.2

    def validate(self):
        _check_choice("backbone", self.backbone, BACKBONES)
        _check_positive("width", self.width)
        if self.backbone == "wrn28_10" and (self.depth - 4) % 6:
            raise ValueError(
                f"Received depth={self.depth} for WRN; expected 6n+4 "
                "(e.g. 28). Set --depth=28."
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(
                f"Received dropout={self.dropout}; expected [0, 1)."
            )
        _check_choice("head", self.head, HEADS)
        _check_positive("head_scale", self.head_scale)
        if self.genotype is not None and self.head != "dense":
            raise ValueError(
                f"Received head={self.head!r} with genotype="
                f"{self.genotype!r}; a searched cell's network has its own "
                "dense head. Set --head=dense or leave --genotype unset.")
        _check_positive("cells", self.cells)
        if self.genotype is not None and self.cells < 3:
            raise ValueError(
                f"Received cells={self.cells}; expected >= 3 so that the "
                "two reduction cells are distinct. Set --cells=20."
            )
        _check_positive("auxiliary_weight", self.auxiliary_weight,
                        allow_zero=True)
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(
                f"Received drop_path_rate={self.drop_path_rate}; expected "
                "[0, 1). Set --drop_path_rate=0.2."
            )
        return self


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Learning rates and SGD settings of every level.

    The W1/W2 step is our own functional SGD (momentum + weight decay), the
    same formula the unroll differentiates, so the hypergradient is taken
    through exactly the step that is applied.
    """

    w1_learning_rate: float = 0.1
    w2_learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    encoder_learning_rate: float = 1e-3
    weighting_learning_rate: float = 1e-3
    example_weight_learning_rate: float = 1e-2
    meta_net_learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_epochs: int = 0
    grad_clip_norm: Optional[float] = 5.0

    def validate(self):
        for field in dataclasses.fields(self):
            if field.name.endswith("learning_rate"):
                _check_positive(field.name, getattr(self, field.name))
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not 0 <= self.momentum < 1:
            raise ValueError(
                f"Received momentum={self.momentum}; expected [0, 1)."
            )
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("grad_clip_norm", self.grad_clip_norm)
        return self


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Which method trains the classifier, and LFM's own switches.

    Attributes:
      method: `erm`, `focal`, `class_balanced`, `l2rw`, `mwnet`, `dbl`,
        `lfm`, `penalty`, `lrw_easy`, `lrw_random`, `lrw_hard` or `molere`.
      hypergradient: `exact`, `finite_difference` or `first_order`.
      encoder: V: `small_cnn`, `resnet18` (separate encoders) or `shared`
        (PS: W1's trunk with separate heads for W1 and W2).
      encoder_weights: optional `.weights.h5` file for V (never downloaded).
      similarity: x's metric: `dot`, `cosine` or `l2` (negative distance).
      use_similarity / use_mistakes / use_label_mask: ablations that drop
        x, u or z (a dropped factor is replaced by ones).
      weighting_mode: r `by_id` (one r_j per meta example, the paper) or
        `positional` (one per meta-batch slot, the authors' code).
      single_network: SN ablation: one network instead of two. W2 is W1:
        the a-weighted step starts from W1' and its result is the network's
        new weights; B, V and r still descend L_val through both steps.
      evaluate_learner: which learner is evaluated and exported: `w1`,
        `w2` or `ensemble` (the mean of W1's and W2's logits).
      lfm_objective: LFM-DR's weight path and stage-3 objective (README,
        "LFM objectives"): `paper` (eq. 9: B weights W1's loss, a W2's,
        B, V, r descend L_val(W2')), `shared` (W2's step is weighted by
        b_i a_i / mean_batch(b a): B shapes both learners, as A does in
        the paper's NAS eq. 8; deploy W2) or `both` (stage 3 descends
        L_val(W1') + L_val(W2')). `both` needs `hypergradient=exact`.
      mistake_weighting: `learned` (a from W1''s mistakes, the paper) or
        `none` (a = 1: the ablation with no mistakes at all).
      mistake_signal: u as W1''s mistake on each meta example (`example`,
        the paper) or on its class, the mean of u over the meta batch's
        examples of that label (`class`): a class-level error rate, less
        noisy than one example's loss, which is what a long tail needs.
      example_weight_granularity: LFM-DR's B as one weight per training
        example (`example`, the paper) or one per (observed) class,
        b_i = B[y_i] (`class`): 10 meta-parameters for the long tail
        instead of one per image, and a per-example signal left to the
        mistake term a alone (under `example`, B's hypergradient is the
        same per-example quantity as a's and leaves a nothing to add).
      example_weight_normalization: stage 1's weights as b_i (`none`,
        the paper: B's scale multiplies W1's learning rate) or
        b_i / mean_batch(b) (`batch_mean`: B only ranks W1's examples).
      mistake_temperature: tau of a_i = sigmoid(s_i / tau), s_i the
        paper's sum_j x_ij z_ij u_j r_j (1.0, the paper). Below 1 it widens
        a's range over the same mistakes: once W1 fits, u is ~0.1-0.5 and
        a stays near sigmoid(0) = 0.5 for every example.
      mistake_centering: take s_i relative to its batch mean,
        a_i = sigmoid((s_i - mean s) / tau): the paper's s >= 0 keeps a in
        [0.5, 1) (at most 2x between examples, whatever tau); centred, a
        spans (0, 1) around the batch's typical mistake.
      weighting_init: r's initial value (1.0, the paper's r = 1).
      diagnostics_every: every this many steps LFM-DR logs `b_alignment`,
        the cosine of B's hypergradient with grad_B L_val(W1') (one extra
        pass through stage 1); 0 turns it off.
      focal_gamma: gamma of the focal loss.
      class_balanced_beta: beta of the effective number (1 - beta^n).
      meta_net_hidden: hidden width of Meta-Weight-Net's MLP.
      fd_epsilon: scale of the finite-difference step, eps = fd_epsilon/|v|.
      dbl_splits: Deep Bilevel Learning's mini-batches per training batch
        (batch_size must divide evenly; the authors use 8 splits of 8, the
        default 4 divides the default batch of 100).
      dbl_mu: the mu of omega_i = <g_val, g_i> / (|g_i|^2 + mu).
      dbl_validation: DBL's validation gradient: `train_split` (split 0 of
        the noisy batch, as the paper: no clean data needed) or `meta` (the
        clean meta batch, with its splits all used for training).
      weight_normalization: `none` (the papers) or `batch_mean`: learned
        per-example weights (MW-Net's, LFM's a) divided by their batch mean,
        so the meta objective cannot lower the validation loss by inflating
        every weight (a larger effective learning rate) and must rank
        examples instead.
      penalty_inner_steps: the penalty method's T, Adam steps on the
        classifier (lower level) per step on the example weights.
      penalty_rho / penalty_lambda / penalty_epsilon: initial rho (penalty
        on |grad_v g|^2), lambda (the small lambda*g term of the lower
        update) and epsilon (the gradient-norm test's threshold).
      penalty_nu: initial value of every entry of the multiplier nu.
      penalty_rho_growth / penalty_lambda_decay / penalty_epsilon_decay:
        factors applied to rho, lambda and epsilon when the test
        |grad_u h|^4 + |grad_v h|^4 < epsilon^2 passes (1.1, 0.9, 0.9).
      penalty_lr_decay: factor on both Adam learning rates when it passes.
      penalty_weight_learning_rate: Adam lr of the weight logits u (3).
      penalty_learner_learning_rate: Adam lr of the classifier v (1e-4).
      penalty_renormalize: once per epoch, rescale the importances
        a = (tanh(u)+1)/2 to mean 0.5, as the authors' scripts do.
      lrw_delta: the validation fraction delta of LRW and MOLERE.
      lrw_margin_folds: LRW's margins: 1 = in-sample (one ERM model on all
        training data); K >= 2 = K-fold cross-fitted (each example scored
        by a model that never saw it).
      lrw_erm_epochs: epochs of each ERM model of LRW's first phase (None:
        `epochs`).
      molere_meta_every: K, classifier steps per meta-net/splitter update.
      molere_warmup_epochs: epochs on the initial random split before the
        splitter starts to re-split.
      molere_splitter_learning_rate: Adam lr of the splitter.
      molere_splitter_hidden: hidden width of the splitter's MLP.
      molere_w_gap / molere_w_ratio / molere_w_balance: weights of the
        Learning-to-Split losses (divided by their sum, as in LS).
      molere_w_adversarial: weight of the splitter's -(soft validation
        loss) term (the MOLERE outer level: make the validation set hard).
    """

    method: str = "lfm"
    hypergradient: str = "exact"
    encoder: str = "small_cnn"
    encoder_weights: Optional[str] = None
    similarity: str = "dot"
    use_similarity: bool = True
    use_mistakes: bool = True
    use_label_mask: bool = True
    weighting_mode: str = "by_id"
    single_network: bool = False
    evaluate_learner: str = "w1"
    lfm_objective: str = "paper"
    mistake_weighting: str = "learned"
    mistake_signal: str = "example"
    example_weight_granularity: str = "example"
    example_weight_normalization: str = "none"
    mistake_temperature: float = 1.0
    mistake_centering: bool = False
    weighting_init: float = 1.0
    diagnostics_every: int = 50
    focal_gamma: float = 2.0
    class_balanced_beta: float = 0.9999
    meta_net_hidden: int = 100
    fd_epsilon: float = 0.01
    dbl_splits: int = 4
    dbl_mu: float = 0.01
    dbl_validation: str = "train_split"
    weight_normalization: str = "none"
    penalty_inner_steps: int = 20
    penalty_rho: float = 1e-2
    penalty_lambda: float = 1e-2
    penalty_epsilon: float = 1e-2
    penalty_nu: float = 1e-4
    penalty_rho_growth: float = 1.1
    penalty_lambda_decay: float = 0.9
    penalty_epsilon_decay: float = 0.9
    penalty_lr_decay: float = 0.9
    penalty_weight_learning_rate: float = 3.0
    penalty_learner_learning_rate: float = 1e-4
    penalty_renormalize: bool = True
    lrw_delta: float = 0.1
    lrw_margin_folds: int = 2
    lrw_erm_epochs: Optional[int] = None
    molere_meta_every: int = 5
    molere_warmup_epochs: int = 0
    molere_splitter_learning_rate: float = 1e-3
    molere_splitter_hidden: int = 64
    molere_w_gap: float = 1.0
    molere_w_ratio: float = 1.0
    molere_w_balance: float = 1.0
    molere_w_adversarial: float = 1.0

    def validate(self):
        _check_choice("method", self.method, METHODS)
        for name in ("penalty_inner_steps", "penalty_rho", "penalty_epsilon",
                     "penalty_rho_growth", "penalty_weight_learning_rate",
                     "penalty_learner_learning_rate", "lrw_margin_folds",
                     "lrw_erm_epochs", "molere_meta_every",
                     "molere_splitter_learning_rate",
                     "molere_splitter_hidden"):
            _check_positive(name, getattr(self, name))
        for name in ("penalty_lambda", "penalty_nu", "molere_warmup_epochs",
                     "molere_w_gap", "molere_w_ratio", "molere_w_balance",
                     "molere_w_adversarial"):
            _check_positive(name, getattr(self, name), allow_zero=True)
        for name in ("penalty_lambda_decay", "penalty_epsilon_decay",
                     "penalty_lr_decay"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(
                    f"Received {name}={getattr(self, name)!r}; expected a "
                    f"factor in (0, 1]. Set --{name}=0.9."
                )
        if not 0 < self.lrw_delta < 1:
            raise ValueError(
                f"Received lrw_delta={self.lrw_delta!r}; expected the "
                "validation fraction in (0, 1). Set --lrw_delta=0.1."
            )
        if self.molere_w_gap + self.molere_w_ratio + self.molere_w_balance <= 0:
            raise ValueError(
                "Received molere_w_gap + molere_w_ratio + molere_w_balance = 0;"
                " expected a positive sum (they are divided by it). Set "
                "--molere_w_gap=1."
            )
        _check_choice("weight_normalization", self.weight_normalization,
                      WEIGHT_NORMALIZATIONS)
        _check_choice("dbl_validation", self.dbl_validation, DBL_VALIDATION)
        _check_positive("dbl_mu", self.dbl_mu)
        if self.dbl_splits < 2:
            raise ValueError(
                f"Received dbl_splits={self.dbl_splits}; expected >= 2 (one "
                "validation and at least one training split)."
            )
        _check_choice("hypergradient", self.hypergradient, HYPERGRADIENTS)
        _check_choice("encoder", self.encoder, ENCODERS)
        _check_choice("similarity", self.similarity, SIMILARITIES)
        _check_choice("weighting_mode", self.weighting_mode, WEIGHTING_MODES)
        _check_choice(
            "evaluate_learner", self.evaluate_learner, EVALUATED_LEARNERS
        )
        _check_choice("lfm_objective", self.lfm_objective, LFM_OBJECTIVES)
        _check_choice("mistake_weighting", self.mistake_weighting,
                      MISTAKE_WEIGHTINGS)
        _check_choice("mistake_signal", self.mistake_signal,
                      MISTAKE_SIGNALS)
        _check_choice("example_weight_normalization",
                      self.example_weight_normalization,
                      WEIGHT_NORMALIZATIONS)
        _check_choice("example_weight_granularity",
                      self.example_weight_granularity,
                      EXAMPLE_WEIGHT_GRANULARITIES)
        _check_positive("mistake_temperature", self.mistake_temperature)
        _check_positive("diagnostics_every", self.diagnostics_every,
                        allow_zero=True)
        if self.lfm_objective == "both" and self.hypergradient != "exact":
            raise ValueError(
                f"Received lfm_objective={self.lfm_objective!r} with "
                f"hypergradient={self.hypergradient!r}; that combination is "
                "not implemented (the chained modes have no path for "
                "L_val(W1')'s own term). Set --hypergradient=exact, which "
                "supports every objective."
            )
        if not 0 < self.class_balanced_beta < 1:
            raise ValueError(
                f"Received class_balanced_beta={self.class_balanced_beta}; "
                "expected (0, 1), e.g. 0.9999."
            )
        _check_positive("focal_gamma", self.focal_gamma, allow_zero=True)
        _check_positive("meta_net_hidden", self.meta_net_hidden)
        _check_positive("fd_epsilon", self.fd_epsilon)
        return self


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The per-example training loss l_i of every learner step.

    It replaces CE in each step that trains a learner (ERM's, LFM's W1 and
    W2 steps, L2RW's and MW-Net's lookahead and real steps, the
    class-balanced weighting's) and composes with the method's weights.
    Meta / validation losses (LFM's u and L_val, MW-Net's and L2RW's meta
    loss) stay plain CE: the meta set is clean and balanced, so CE is its
    standard objective. Inference uses the learner's plain logits.

    Attributes:
      loss: `ce`, `focal` (gamma: `focal_gamma`), `logit_adjusted` (Menon
        et al. 2021), `balanced_softmax` (Ren et al. 2020), `ldam` (Cao et
        al. 2019) or `gce` (Zhang & Sabuncu 2018). Class priors and counts
        come from the observed (possibly noisy) training labels.
      logit_adjust_tau: tau of CE(z + tau log pi), >= 0 (1.0).
      ldam_max_margin: LDAM's largest margin, the rarest class's (0.5).
      ldam_scale: LDAM's s on the margin-adjusted logits (30, the
        paper's). The paper's head is cosine (normalised features and
        weights); ours are plain dense layers, so s also scales unnormalised
        logits and the head's gradient; measured on digits IF=20, s = 30
        beats s = 1 by far (README, "The loss axis").
      gce_q: q of (1 - p_y^q)/q, in (0, 1] (0.7).
      drw_start_epoch: LDAM's deferred re-weighting: from this epoch
        (0-based) every l_i is multiplied by its class's class-balanced
        weight; None: off (the paper: 160 of 200). Composes with any loss.
      drw_beta: beta of DRW's effective number (0.9999).
    """

    loss: str = "ce"
    logit_adjust_tau: float = 1.0
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    gce_q: float = 0.7
    drw_start_epoch: Optional[int] = None
    drw_beta: float = 0.9999

    def validate(self):
        _check_choice("loss", self.loss, LOSSES)
        _check_positive("logit_adjust_tau", self.logit_adjust_tau,
                        allow_zero=True)
        _check_positive("ldam_max_margin", self.ldam_max_margin)
        _check_positive("ldam_scale", self.ldam_scale)
        _check_positive("drw_start_epoch", self.drw_start_epoch,
                        allow_zero=True)
        if not 0 < self.gce_q <= 1:
            raise ValueError(
                f"Received gce_q={self.gce_q!r}; expected q in (0, 1] (q -> 0"
                " is CE, 1 is MAE). Set --gce_q=0.7."
            )
        if not 0 < self.drw_beta < 1:
            raise ValueError(
                f"Received drw_beta={self.drw_beta!r}; expected (0, 1). Set "
                "--drw_beta=0.9999."
            )
        return self

    @property
    def is_cross_entropy(self):
        """Whether l_i is plain CE (no other loss, no DRW)."""
        return self.loss == "ce" and self.drw_start_epoch is None


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Differentiable architecture search (DARTS, P-DARTS and their LFM
    versions; `method=darts` or `lfm_darts`).

    Attributes:
      search_channels: C of the supernet's first cells (16).
      search_cells: supernet cells (8 for DARTS; P-DARTS' first stage 5).
      search_steps: intermediate nodes per cell (4).
      search_primitives: comma-separated candidate ops (all 8 by default;
        fewer only for quick tests).
      arch_order: `second` (DARTS' unrolled architecture gradient through
        one virtual SGD step) or `first` (xi = 0). LFM-DARTS always
        differentiates through both of its unrolled steps.
      arch_learning_rate: Adam lr of α (DARTS 3e-4, P-DARTS 6e-4).
      arch_weight_decay: coupled L2 on α, added to its gradient (1e-3).
      arch_beta_1: Adam beta_1 of α (0.5).
      arch_grad_clip_norm: clip α's gradient to this norm (P-DARTS 5;
        None: DARTS, no clip).
      arch_init_scale: α starts at arch_init_scale * N(0, 1) (1e-3).
      arch_warmup_epochs: epochs per stage that train the weights only
        (P-DARTS 10; DARTS 0).
      progressive: P-DARTS: stages of growing depth, dropping the weakest
        ops after each.
      pdarts_add_cells: cells added per stage to `search_cells` (0,6,12).
      pdarts_num_to_keep: ops kept per edge after each stage (5,3,1).
      pdarts_skip_dropout: skip-connect dropout rate per stage (0,0.4,0.7
        for CIFAR-10, the paper and author).
      pdarts_max_skips: skip-connects allowed in the final normal cell (2).
      eval_flagfile: the evaluation protocol the printed training command
        uses (DARTS': 600 epochs, 36 channels, 20 cells, auxiliary head,
        cutout, drop path).
    """

    search_channels: int = 16
    search_cells: int = 8
    search_steps: int = 4
    search_primitives: str = ",".join(PRIMITIVES)
    arch_order: str = "second"
    arch_learning_rate: float = 3e-4
    arch_weight_decay: float = 1e-3
    arch_beta_1: float = 0.5
    arch_grad_clip_norm: Optional[float] = None
    arch_init_scale: float = 1e-3
    arch_warmup_epochs: int = 0
    progressive: bool = False
    pdarts_add_cells: str = "0,6,12"
    pdarts_num_to_keep: str = "5,3,1"
    pdarts_skip_dropout: str = "0.0,0.4,0.7"
    pdarts_max_skips: int = 2
    eval_flagfile: str = "configs/train/darts_eval_cifar10.flags"

    @property
    def primitives(self):
        return parse_list("search_primitives", self.search_primitives, str)

    @property
    def stages(self):
        """[(cells, ops kept after the stage, skip dropout)] of the search."""
        if not self.progressive:
            return [(self.search_cells, None, 0.0)]
        add = parse_list("pdarts_add_cells", self.pdarts_add_cells, int)
        keep = parse_list("pdarts_num_to_keep", self.pdarts_num_to_keep, int)
        drop = parse_list("pdarts_skip_dropout", self.pdarts_skip_dropout)
        if not len(add) == len(keep) == len(drop) or not add:
            raise ValueError(
                f"Received pdarts_add_cells={self.pdarts_add_cells!r}, "
                f"pdarts_num_to_keep={self.pdarts_num_to_keep!r} and "
                f"pdarts_skip_dropout={self.pdarts_skip_dropout!r}; expected "
                "one value per stage in each, e.g. 0,6,12 / 5,3,1 / "
                "0.0,0.4,0.7."
            )
        return [(self.search_cells + a, k, d)
                for a, k, d in zip(add, keep, drop)]

    def validate(self):
        for name in ("search_channels", "search_cells", "search_steps",
                     "arch_learning_rate", "arch_grad_clip_norm",
                     "arch_init_scale"):
            _check_positive(name, getattr(self, name))
        _check_positive("arch_weight_decay", self.arch_weight_decay,
                        allow_zero=True)
        _check_positive("arch_warmup_epochs", self.arch_warmup_epochs,
                        allow_zero=True)
        _check_positive("pdarts_max_skips", self.pdarts_max_skips,
                        allow_zero=True)
        _check_choice("arch_order", self.arch_order, ARCH_ORDERS)
        if self.search_channels % 2:
            raise ValueError(
                f"Received search_channels={self.search_channels}; expected "
                "an even number (FactorizedReduce halves it). Set "
                "--search_channels=16."
            )
        unknown = [p for p in self.primitives if p not in PRIMITIVES]
        if unknown or len(set(self.primitives)) < 2:
            raise ValueError(
                f"Received search_primitives={self.search_primitives!r}; "
                f"expected at least two distinct ops of {list(PRIMITIVES)}."
            )
        if not 0 < self.arch_beta_1 < 1:
            raise ValueError(
                f"Received arch_beta_1={self.arch_beta_1}; expected (0, 1)."
            )
        ops_on = len(self.primitives)
        for cells, keep, rate in self.stages:
            if cells < 3:
                raise ValueError(
                    f"Received a search stage of {cells} cells; expected >= 3"
                    " (two distinct reduction cells). Raise --search_cells."
                )
            if keep is not None and not 1 <= keep < ops_on:
                raise ValueError(
                    f"Received pdarts_num_to_keep={self.pdarts_num_to_keep!r}"
                    f" with {ops_on} ops on; expected a decreasing list that "
                    "ends at 1."
                )
            if not 0 <= rate < 1:
                raise ValueError(
                    f"Received skip dropout {rate}; expected [0, 1)."
                )
            ops_on = keep if keep is not None else ops_on
        if self.progressive and ops_on != 1:
            raise ValueError(
                f"Received pdarts_num_to_keep={self.pdarts_num_to_keep!r}; "
                "expected the last stage to keep 1 op per edge."
            )
        return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how the Keras loop runs.

    Attributes:
      epochs: training epochs.
      steps_per_epoch: cap on steps per epoch (None: one pass over train).
      jit_compile: XLA for train_step; explicit, off by default (slower on CPU
        and no float64 MaxPoolGradGrad).
      run_eagerly: debug switch.
      deterministic: enable TF op determinism (with `seed`).
      checkpoint_every_steps: write a whole-state checkpoint (README "Scale
        and resume") every this many steps, besides the one at every epoch
        end; None: epoch ends only. A run finds the newest in
        `<workdir>/backup` and continues from it.
      checkpoints_to_keep: how many of the newest checkpoints are kept.
      strategy: tf.distribute strategy: `default` (none), `one_device`,
        `mirrored` (all local GPUs), `multi_worker` (cluster from
        `TF_CONFIG`) or `tpu`.
      tpu: TPU name or address for `strategy=tpu` (None: the local TPU).
      mixed_precision: `none`, `mixed_bfloat16` or `mixed_float16`
        (compute in bfloat16 / float16; variables, heads, losses and
        finite-difference perturbations in float32). float16 uses dynamic
        loss scaling through the unrolled inner steps and the outer
        gradients of every method (optimization/loss_scale.py).
      overwrite: replace a previous run of another configuration in the
        workdir (its artefacts are deleted first); without it such a
        workdir is refused. Not part of what a run computes, so it never
        counts as a configuration difference (`workdir.py`).
    """

    epochs: int = 1
    steps_per_epoch: Optional[int] = None
    jit_compile: bool = False
    run_eagerly: bool = False
    deterministic: bool = False
    checkpoint_every_steps: Optional[int] = None
    checkpoints_to_keep: int = 2
    strategy: str = "default"
    tpu: Optional[str] = None
    mixed_precision: str = "none"
    overwrite: bool = False

    def validate(self):
        _check_positive("epochs", self.epochs)
        _check_positive("steps_per_epoch", self.steps_per_epoch)
        _check_positive("checkpoint_every_steps", self.checkpoint_every_steps)
        _check_positive("checkpoints_to_keep", self.checkpoints_to_keep)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("mixed_precision", self.mixed_precision,
                      MIXED_PRECISION)
        if self.tpu is not None and self.strategy != "tpu":
            raise ValueError(
                f"Received tpu={self.tpu!r} with strategy={self.strategy!r}; "
                "expected --strategy=tpu with --tpu. Set --strategy=tpu."
            )
        return self


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run needs; written to `<workdir>/config.json`."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=OptimizerConfig
    )
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self):
        for group in self.groups():
            group.validate()
        if (
            self.method.method == "dbl"
            and self.data.batch_size % self.method.dbl_splits
        ):
            raise ValueError(
                f"Received batch_size={self.data.batch_size} with "
                f"dbl_splits={self.method.dbl_splits}; expected the batch to "
                "split evenly. Set --batch_size to a multiple of "
                f"{self.method.dbl_splits}."
            )
        self._validate_loss()
        if (self.model.head != "dense" and self.method.method == "lfm"
                and self.method.hypergradient == "first_order"):
            raise ValueError(
                f"Received head={self.model.head!r} with hypergradient="
                "'first_order'; first_order uses the closed-form gradient of "
                "a dense head. Set --hypergradient=exact (or "
                "finite_difference), or --head=dense."
            )
        return self

    def _validate_loss(self):
        """The loss axis against the method and the schedule."""
        loss = self.loss
        if loss.is_cross_entropy:
            return
        what = (f"loss={loss.loss!r}, drw_start_epoch="
                f"{loss.drw_start_epoch!r}")
        if self.method.method not in LOSS_METHODS:
            raise ValueError(
                f"Received method={self.method.method!r} with {what}; the "
                f"loss axis applies to {list(LOSS_METHODS)}. Set --loss=ce "
                "and leave --drw_start_epoch unset, or pick one of these "
                "methods."
            )
        if self.method.method == "focal" and loss.loss not in ("ce", "focal"):
            raise ValueError(
                f"Received method='focal' with loss={loss.loss!r}; the focal "
                "method is ERM with --loss=focal. Set --method=erm "
                f"--loss={loss.loss}."
            )
        if (self.method.method == "lfm"
                and self.method.hypergradient == "first_order"):
            raise ValueError(
                f"Received hypergradient='first_order' with {what}; "
                "first_order uses the closed-form head gradient of plain CE."
                " Set --hypergradient=exact or --hypergradient="
                "finite_difference (both work with any loss), or --loss=ce "
                "without DRW."
            )
        if (loss.drw_start_epoch is not None
                and loss.drw_start_epoch >= self.train.epochs):
            raise ValueError(
                f"Received drw_start_epoch={loss.drw_start_epoch} with "
                f"epochs={self.train.epochs}; expected an epoch in [0, "
                f"{self.train.epochs - 1}], or DRW never switches on. Lower "
                "--drw_start_epoch (the paper: 160 of 200 epochs)."
            )

    def groups(self) -> Tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values):
        kwargs = {}
        for field in dataclasses.fields(cls):
            group_cls = field.default_factory
            kwargs[field.name] = group_cls(**values.get(field.name, {}))
        return cls(**kwargs)

    def replace(self, **overrides):
        """Returns a copy with flat field overrides, e.g. `noise_rate=0.4`.

        Raises:
          ValueError: an override names no field of any group.
        """
        groups = {}
        remaining = dict(overrides)
        for field in dataclasses.fields(self):
            group = getattr(self, field.name)
            names = {f.name for f in dataclasses.fields(group)}
            mine = {k: v for k, v in remaining.items() if k in names}
            for key in mine:
                remaining.pop(key)
            groups[field.name] = dataclasses.replace(group, **mine)
        if remaining:
            raise ValueError(
                f"Received unknown config fields {sorted(remaining)}; expected "
                f"fields of {[f.name for f in dataclasses.fields(self)]}."
            )
        return ExperimentConfig(**groups)


def field_names():
    """All flat field names, in group order (each is also a flag name)."""
    names = []
    for field in dataclasses.fields(ExperimentConfig):
        names.extend(f.name for f in dataclasses.fields(field.default_factory))
    return names
