"""P-DARTS' schedule and its search-space approximation (research/nas.md §5).

Pure numpy: the skip-connect dropout rate per epoch, dropping the weakest
ops of every edge after a stage, and the final derivation with the limit on
skip-connects in the normal cell.
"""

import math
from typing import List, Sequence, Tuple

import numpy as np

from lfm_tf.nas import genotypes


def skip_dropout_rate(rate: float, epoch: int, epochs: int,
                      warmup_epochs: int) -> float:
    """P-DARTS' skip-connect dropout at `epoch` of a stage.

    Falls linearly during the weight-only warm-up, r (E - e - 1) / E, then
    jumps back to r when α starts to move and decays as r exp(-0.2 (e - w)).
    """
    if epoch < warmup_epochs:
        return rate * (epochs - epoch - 1) / epochs
    return rate * math.exp(-0.2 * (epoch - warmup_epochs))


def keep_strongest(probabilities: np.ndarray, edge_ops: Sequence[Sequence[str]],
                   num_keep: int) -> Tuple[Tuple[str, ...], ...]:
    """The ops each edge keeps for the next stage.

    The `num_keep` most probable ops of every edge stay, in their original
    order. When one op is kept it is the strongest non-`none` op (`none` is
    dropped first at the last drop, as P-DARTS does).

    Args:
      probabilities: float [E, K], row softmax of the stage's α.
      edge_ops: E tuples of the K op names of each edge's columns.
      num_keep: ops left per edge.

    Returns:
      E tuples of op names.
    """
    kept = []
    for row, ops in zip(np.asarray(probabilities, np.float64), edge_ops):
        candidates = list(range(len(ops)))
        if num_keep == 1:
            candidates = [k for k in candidates if ops[k] != "none"]
        order = sorted(candidates, key=lambda k: (-row[k], k))
        chosen = sorted(order[:num_keep])
        kept.append(tuple(ops[k] for k in chosen))
    return tuple(kept)


def _edge_choice(probabilities, edge_ops, steps):
    """Per edge its strongest non-none op and that op's probability; per
    node the two strongest edges (node 0 keeps both of its)."""
    best = []
    for row, ops in zip(probabilities, edge_ops):
        candidates = [k for k, op in enumerate(ops) if op != "none"]
        k = max(candidates, key=lambda c: (row[c], -c))
        best.append((ops[k], k, row[k]))
    kept, start = [], 0
    for node in range(steps):
        rows = list(range(start, start + node + 2))
        order = sorted(rows, key=lambda r: (-best[r][2], r))
        kept.extend(sorted(order[:2]))
        start += node + 2
    return best, kept


def _input_state(edge, steps):
    start = 0
    for node in range(steps):
        if edge < start + node + 2:
            return edge - start
        start += node + 2
    raise ValueError(f"Edge {edge} is outside a cell of {steps} nodes.")


def derive_cell(probabilities, edge_ops, steps) -> List[genotypes.Edge]:
    """P-DARTS' parse: `none` ignored, two edges per node, listed in edge
    order (not by strength, unlike DARTS)."""
    best, kept = _edge_choice(np.asarray(probabilities, np.float64),
                              edge_ops, steps)
    return [(best[e][0], _input_state(e, steps)) for e in kept]


def restrict_skips(probabilities, edge_ops, steps, max_skips):
    """The normal cell with at most `max_skips` skip-connects.

    While the parse has too many, the weakest chosen skip-connect's
    probability is zeroed and the cell re-parsed (its edge may then take
    another op, and the node other edges), as P-DARTS' final loop does.
    """
    probabilities = np.array(probabilities, np.float64)
    while True:
        best, kept = _edge_choice(probabilities, edge_ops, steps)
        skips = [e for e in kept if best[e][0] == "skip_connect"]
        if len(skips) <= max_skips:
            return [(best[e][0], _input_state(e, steps)) for e in kept]
        weakest = min(skips, key=lambda e: (best[e][2], e))
        probabilities[weakest, best[weakest][1]] = 0.0


def derive(normal_probabilities, reduce_probabilities, normal_ops,
           reduce_ops, steps=4, max_skips=2) -> genotypes.Genotype:
    """The final P-DARTS genotype (skip limit on the normal cell only)."""
    concat = tuple(range(2, steps + 2))
    return genotypes.Genotype(
        normal=tuple(restrict_skips(normal_probabilities, normal_ops, steps,
                                    max_skips)),
        normal_concat=concat,
        reduce=tuple(derive_cell(reduce_probabilities, reduce_ops, steps)),
        reduce_concat=concat,
    )
