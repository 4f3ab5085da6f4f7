"""Genotypes: the discrete cells a search produces, as data (JSON).

A genotype lists, for the normal and the reduction cell, two `(op, input)`
pairs per intermediate node; pairs 2i and 2i+1 feed node i. Inputs number the
cell's states: 0 = c_{k-2}, 1 = c_{k-1}, 2 = node 0, ... (research/nas.md
§3.1). Searches write `genotype.json`; nothing is pasted into source except
the published cells users ask for by name.
"""

import dataclasses
import json
import os
from typing import List, Sequence, Tuple

import numpy as np

from lfm_tf import fileio
from lfm_tf.nas import operations

Edge = Tuple[str, int]


@dataclasses.dataclass(frozen=True)
class Genotype:
    """A normal and a reduction cell.

    Attributes:
      normal: 2 * steps `(op, input state)` pairs of the normal cell.
      normal_concat: states concatenated into the normal cell's output.
      reduce: the same for the reduction cell.
      reduce_concat: states concatenated into the reduction cell's output.
    """

    normal: Tuple[Edge, ...]
    normal_concat: Tuple[int, ...]
    reduce: Tuple[Edge, ...]
    reduce_concat: Tuple[int, ...]

    def __post_init__(self):
        for kind in ("normal", "reduce"):
            edges = tuple((str(op), int(j)) for op, j in getattr(self, kind))
            concat = tuple(int(i) for i in getattr(self, kind + "_concat"))
            object.__setattr__(self, kind, edges)
            object.__setattr__(self, kind + "_concat", concat)
            _check_cell(kind, edges, concat)

    @property
    def steps(self) -> int:
        """Intermediate nodes per cell."""
        return len(self.normal) // 2

    def skip_count(self, kind="normal") -> int:
        return sum(op == "skip_connect" for op, _ in getattr(self, kind))

    def to_dict(self):
        return {
            "normal": [list(e) for e in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(e) for e in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, values):
        missing = {"normal", "normal_concat", "reduce", "reduce_concat"} - set(
            values)
        if missing:
            raise ValueError(
                f"Received a genotype without {sorted(missing)}; expected the "
                "keys normal, normal_concat, reduce, reduce_concat (the "
                "genotype.json a search writes)."
            )
        return cls(
            normal=tuple(tuple(e) for e in values["normal"]),
            normal_concat=tuple(values["normal_concat"]),
            reduce=tuple(tuple(e) for e in values["reduce"]),
            reduce_concat=tuple(values["reduce_concat"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path):
        """Writes JSON atomically."""
        fileio.write_text(path, self.to_json() + "\n")


def _check_cell(kind, edges, concat):
    if len(edges) < 2 or len(edges) % 2:
        raise ValueError(
            f"Received {len(edges)} {kind} edges; expected two per node."
        )
    for i, (op, j) in enumerate(edges):
        if op not in operations.OPS or op == "none":
            raise ValueError(
                f"Received {kind} op {op!r}; expected one of "
                f"{list(operations.PRIMITIVES[1:])}."
            )
        node = i // 2
        if not 0 <= j < node + 2:
            raise ValueError(
                f"Received {kind} edge {i} from state {j}; node {node} can "
                f"only take states 0..{node + 1}."
            )
    states = len(edges) // 2 + 2
    if not concat or any(not 0 <= i < states for i in concat):
        raise ValueError(
            f"Received {kind}_concat={list(concat)}; expected states in "
            f"0..{states - 1}."
        )


# Published cells (research/nas.md §3.3), for `--genotype=<NAME>`.
DARTS_V1 = Genotype(
    normal=(("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0), ("skip_connect", 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2),
            ("max_pool_3x3", 0), ("max_pool_3x3", 0), ("skip_connect", 2),
            ("skip_connect", 2), ("avg_pool_3x3", 0)),
    reduce_concat=(2, 3, 4, 5),
)
DARTS_V2 = Genotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 1), ("skip_connect", 0),
            ("skip_connect", 0), ("dil_conv_3x3", 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2),
            ("max_pool_3x3", 1), ("max_pool_3x3", 0), ("skip_connect", 2),
            ("skip_connect", 2), ("max_pool_3x3", 1)),
    reduce_concat=(2, 3, 4, 5),
)
PDARTS = Genotype(
    normal=(("skip_connect", 0), ("dil_conv_3x3", 1), ("skip_connect", 0),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 1), ("sep_conv_3x3", 3),
            ("sep_conv_3x3", 0), ("dil_conv_5x5", 4)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 0),
            ("dil_conv_5x5", 2), ("max_pool_3x3", 0), ("dil_conv_3x3", 1),
            ("dil_conv_3x3", 1), ("dil_conv_5x5", 3)),
    reduce_concat=(2, 3, 4, 5),
)
KNOWN = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS_V2,
         "PDARTS": PDARTS}


def load(name_or_path: str) -> Genotype:
    """A published genotype by name, a `genotype.json` (or its folder), or
    the JSON text itself (as export_info.json carries it).

    Raises:
      ValueError: neither a known name nor a readable genotype file.
    """
    if name_or_path in KNOWN:
        return KNOWN[name_or_path]
    if name_or_path.lstrip().startswith("{"):
        return Genotype.from_dict(json.loads(name_or_path))
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "genotype.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"Received genotype={name_or_path!r}; expected one of "
            f"{sorted(KNOWN)} or the path of a genotype.json (or of the "
            "search workdir holding it)."
        )
    with open(path) as f:
        try:
            values = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"Received {path}, which is not JSON ({error}); expected the "
                "genotype.json a search writes."
            ) from None
    return Genotype.from_dict(values)


def num_edges(steps: int) -> int:
    """Edges of a search cell: node i has i + 2 inputs."""
    return sum(i + 2 for i in range(steps))


def _node_rows(steps):
    start = 0
    for node in range(steps):
        yield node, range(start, start + node + 2)
        start += node + 2


def derive_cell(probabilities: np.ndarray,
                edge_ops: Sequence[Sequence[str]], steps: int) -> List[Edge]:
    """DARTS' parse of one cell (research/nas.md §3.2).

    Per node: the two incoming edges whose strongest non-`none` op is
    strongest (stable: ties go to the lower edge), stronger first; each with
    its strongest non-`none` op (ties to the earlier op).

    Args:
      probabilities: float [E, K], softmax of the cell's logits per edge.
      edge_ops: E sequences of the K op names each edge's columns stand for.
      steps: intermediate nodes.

    Returns:
      2 * steps `(op, input state)` pairs.
    """
    probabilities = np.asarray(probabilities, np.float64)
    if probabilities.shape[0] != num_edges(steps):
        raise ValueError(
            f"Received probabilities of shape {probabilities.shape}; "
            f"expected {num_edges(steps)} rows for {steps} nodes."
        )
    edges = []
    for _, rows in _node_rows(steps):
        best = []
        for j, row in enumerate(rows):
            ops_of_edge = list(edge_ops[row])
            candidates = [k for k, op in enumerate(ops_of_edge) if op != "none"]
            if not candidates:
                raise ValueError(f"Edge {row} has only the none op left.")
            k = max(candidates, key=lambda c: (probabilities[row, c], -c))
            best.append((probabilities[row, k], j, ops_of_edge[k]))
        best.sort(key=lambda t: (-t[0], t[1]))
        edges.extend((op, j) for _, j, op in best[:2])
    return edges


def random_genotype(seed: int, steps: int = 4,
                    primitives: Sequence[str] = operations.PRIMITIVES,
                    multiplier=None) -> Genotype:
    """A cell drawn at random from the search space (DARTS' random baseline).

    DARTS' sampling rule, for the normal and the reduction cell alike:
    every intermediate node takes 2 distinct earlier states as inputs, each
    through an op drawn uniformly from the non-`none` primitives. Pure: the
    same arguments give the same genotype.

    Args:
      seed: the draw's seed.
      steps: intermediate nodes per cell, as in the searched space.
      primitives: the searched space's candidate ops (`none` is never drawn:
        the parse never keeps it).
      multiplier: the last `multiplier` nodes (default: all) are
        concatenated, as `derive` does.

    Returns:
      a `Genotype`.

    Raises:
      ValueError: no op besides `none`, or fewer than one node.
    """
    ops = [op for op in primitives if op != "none"]
    if not ops or steps < 1:
        raise ValueError(
            f"Received primitives={list(primitives)} and steps={steps}; "
            "expected at least one op besides none and one node, e.g. "
            "--search_primitives=none,max_pool_3x3,skip_connect,sep_conv_3x3."
        )
    rng = np.random.default_rng(seed)

    def cell():
        edges = []
        for node in range(steps):
            # Node i sees c_{k-2}, c_{k-1} and nodes 0..i-1: i + 2 states.
            inputs = rng.choice(node + 2, size=2, replace=False)
            edges.extend((ops[int(rng.integers(len(ops)))], int(j))
                         for j in inputs)
        return tuple(edges)

    multiplier = multiplier or steps
    concat = tuple(range(2 + steps - multiplier, steps + 2))
    normal = cell()
    return Genotype(normal=normal, normal_concat=concat, reduce=cell(),
                    reduce_concat=concat)


def derive(normal_probabilities, reduce_probabilities, normal_ops,
           reduce_ops, steps=4, multiplier=None) -> Genotype:
    """The genotype of softmaxed architecture logits (DARTS' parse); the
    last `multiplier` (default: all) nodes are concatenated."""
    multiplier = multiplier or steps
    concat = tuple(range(2 + steps - multiplier, steps + 2))
    return Genotype(
        normal=tuple(derive_cell(normal_probabilities, normal_ops, steps)),
        normal_concat=concat,
        reduce=tuple(derive_cell(reduce_probabilities, reduce_ops, steps)),
        reduce_concat=concat,
    )
