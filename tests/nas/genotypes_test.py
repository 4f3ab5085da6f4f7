"""Genotype derivation against the reference parse, P-DARTS' schedule and
final derivation against outputs of the reference helpers (nas.md §10)."""

import json
import os
import tempfile

import numpy as np
import tensorflow as tf

from lfm_tf.nas import genotypes
from lfm_tf.nas import operations
from lfm_tf.nas import pdarts

FULL = tuple(operations.PRIMITIVES for _ in range(14))


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class DartsDerivationTest(tf.test.TestCase):

    def test_hand_set_alphas_give_the_reference_cells(self):
        i, k = np.arange(14)[:, None], np.arange(8)[None, :]
        got = genotypes.derive(_softmax(np.sin(1.0 + 8 * i + k)),
                               _softmax(np.cos(1.0 + 8 * i + k)), FULL, FULL)
        self.assertEqual(got.normal, (
            ("sep_conv_5x5", 1), ("dil_conv_5x5", 0), ("skip_connect", 0),
            ("avg_pool_3x3", 1), ("skip_connect", 1), ("sep_conv_5x5", 0),
            ("sep_conv_3x3", 0), ("skip_connect", 4)))
        self.assertEqual(got.reduce, (
            ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_5x5", 2),
            ("avg_pool_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 3),
            ("sep_conv_3x3", 3), ("avg_pool_3x3", 0)))
        self.assertEqual(got.normal_concat, (2, 3, 4, 5))

    def test_ties_go_to_lower_edges_and_ops(self):
        uniform = np.full((14, 8), 1 / 8)
        got = genotypes.derive(uniform, uniform, FULL, FULL)
        self.assertEqual(got.normal, (("max_pool_3x3", 0),
                                      ("max_pool_3x3", 1)) * 4)

    def test_none_never_chosen_even_when_strongest(self):
        probabilities = np.full((5, 3), 0.1)
        probabilities[:, 0] = 0.8
        ops = tuple(("none", "skip_connect", "sep_conv_3x3")
                    for _ in range(5))
        cell = genotypes.derive_cell(probabilities, ops, steps=2)
        self.assertNotIn("none", [op for op, _ in cell])

    def test_json_round_trip_and_loading(self):
        with tempfile.TemporaryDirectory() as workdir:
            path = os.path.join(workdir, "genotype.json")
            genotypes.PDARTS.save(path)
            self.assertEqual(genotypes.load(path), genotypes.PDARTS)
            self.assertEqual(genotypes.load(workdir), genotypes.PDARTS)
            with open(path) as f:
                text = f.read()
            self.assertEqual(genotypes.load(text), genotypes.PDARTS)
            self.assertEqual(json.loads(text)["normal"][1],
                             ["dil_conv_3x3", 1])
        self.assertIs(genotypes.load("DARTS"), genotypes.DARTS_V2)

    def test_bad_genotypes_are_named(self):
        with self.assertRaisesRegex(ValueError, "DARTS_V2"):
            genotypes.load("NOT_A_GENOTYPE")
        with self.assertRaisesRegex(ValueError, "node 0 can only take"):
            genotypes.Genotype((("sep_conv_3x3", 2), ("skip_connect", 0)),
                               (2,), (("sep_conv_3x3", 0),) * 2, (2,))
        with self.assertRaisesRegex(ValueError, "op 'conv_9x9'"):
            genotypes.Genotype((("conv_9x9", 0), ("skip_connect", 1)), (2,),
                               (("sep_conv_3x3", 0),) * 2, (2,))
        with self.assertRaisesRegex(ValueError, "without"):
            genotypes.Genotype.from_dict({"normal": []})


class RandomGenotypeTest(tf.test.TestCase):

    OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")

    def test_same_seed_same_cell_other_seeds_differ(self):
        first = genotypes.random_genotype(3, steps=3, primitives=self.OPS)
        self.assertEqual(
            genotypes.random_genotype(3, steps=3, primitives=self.OPS), first)
        others = {genotypes.random_genotype(s, steps=3, primitives=self.OPS)
                  for s in range(8)}
        self.assertGreater(len(others), 1)

    def test_darts_sampling_rule(self):
        for seed in range(20):
            genotype = genotypes.random_genotype(seed, steps=4,
                                                 primitives=self.OPS)
            self.assertEqual(genotype.steps, 4)
            self.assertEqual(genotype.normal_concat, (2, 3, 4, 5))
            self.assertEqual(genotype.reduce_concat, (2, 3, 4, 5))
            for edges in (genotype.normal, genotype.reduce):
                for node in range(4):
                    (op_a, a), (op_b, b) = edges[2 * node:2 * node + 2]
                    self.assertNotEqual(a, b)  # Two distinct inputs.
                    self.assertLess(max(a, b), node + 2)  # Earlier states.
                    self.assertNotIn("none", (op_a, op_b))
                    self.assertIn(op_a, self.OPS)
                    self.assertIn(op_b, self.OPS)

    def test_every_op_and_input_is_drawn(self):
        drawn = [genotypes.random_genotype(s, steps=2, primitives=self.OPS)
                 for s in range(30)]
        ops = {op for g in drawn for op, _ in g.normal + g.reduce}
        self.assertEqual(ops, set(self.OPS[1:]))
        last_node_inputs = {j for g in drawn for _, j in g.normal[2:]}
        self.assertEqual(last_node_inputs, {0, 1, 2})

    def test_loads_through_the_genotype_json_path(self):
        genotype = genotypes.random_genotype(1)
        with tempfile.TemporaryDirectory() as directory:
            genotype.save(os.path.join(directory, "genotype.json"))
            self.assertEqual(genotypes.load(directory), genotype)
        self.assertEqual(genotypes.load(genotype.to_json()), genotype)

    def test_space_without_ops_is_refused(self):
        with self.assertRaisesRegex(ValueError, "besides none"):
            genotypes.random_genotype(0, primitives=("none",))


class PdartsTest(tf.test.TestCase):

    def test_skip_dropout_schedule(self):
        rates = [pdarts.skip_dropout_rate(0.4, e, 25, 10)
                 for e in (0, 9, 10, 15, 20, 24)]
        self.assertAllClose(rates, [0.384, 0.240, 0.400, 0.147, 0.054,
                                    0.0243], atol=6e-4)

    def test_keep_strongest(self):
        ops = (("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"),)
        probabilities = np.array([[0.4, 0.1, 0.2, 0.3]])
        self.assertEqual(pdarts.keep_strongest(probabilities, ops, 2),
                         (("none", "sep_conv_3x3"),))
        # The last drop never keeps `none`.
        self.assertEqual(pdarts.keep_strongest(probabilities, ops, 1),
                         (("sep_conv_3x3",),))

    def test_final_derivation_and_skip_limit_match_the_reference(self):
        normal_ops, reduce_ops = [], []
        normal_logits = np.zeros((14, 3))
        reduce_logits = np.zeros((14, 3))
        for i in range(14):
            even = i % 2 == 0
            normal = (("none", "skip_connect", "sep_conv_3x3") if even else
                      ("skip_connect", "sep_conv_3x3", "dil_conv_3x3"))
            reduce = (("skip_connect", "sep_conv_3x3", "dil_conv_3x3")
                      if even else ("none", "skip_connect", "sep_conv_3x3"))
            normal_ops.append(normal)
            reduce_ops.append(reduce)
            for c in range(3):
                normal_logits[i, c] = 2 * np.sin(2 + 3 * i + c) + (
                    normal[c] == "skip_connect")
                reduce_logits[i, c] = 2 * np.cos(2 + 3 * i + c)
        normal_p, reduce_p = _softmax(normal_logits), _softmax(reduce_logits)
        unrestricted = pdarts.restrict_skips(normal_p, normal_ops, 4, 8)
        self.assertEqual(unrestricted, [
            ("skip_connect", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1),
            ("skip_connect", 2), ("dil_conv_3x3", 0), ("skip_connect", 3),
            ("skip_connect", 1), ("skip_connect", 4)])
        got = pdarts.derive(normal_p, reduce_p, normal_ops, reduce_ops)
        self.assertEqual(got.normal, (
            ("sep_conv_3x3", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1),
            ("sep_conv_3x3", 2), ("dil_conv_3x3", 0), ("dil_conv_3x3", 2),
            ("skip_connect", 1), ("skip_connect", 4)))
        self.assertEqual(got.reduce, (
            ("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0),
            ("skip_connect", 2), ("skip_connect", 1), ("skip_connect", 3),
            ("sep_conv_3x3", 2), ("sep_conv_3x3", 4)))
        none_left = pdarts.restrict_skips(normal_p, normal_ops, 4, 0)
        self.assertEqual(none_left[-1], ("sep_conv_3x3", 3))
        self.assertNotIn("skip_connect", [op for op, _ in none_left])


if __name__ == "__main__":
    tf.test.main()
