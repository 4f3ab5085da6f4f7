"""Flags mirror config fields one to one; every shipped flagfile validates."""

import glob
import os

import tensorflow as tf
from absl import flags
from absl.testing import parameterized

from lfm_tf import config as config_lib
from pipelines import flags as flags_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
FLAGFILES = sorted(
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, "configs", "**", "*.flags"),
                       recursive=True)
    # The grid's flagfiles carry pipelines.benchmark's own flags; its tests
    # parse them.
    if os.sep + "benchmark" + os.sep not in p)


class FlagsTest(tf.test.TestCase, parameterized.TestCase):

    def test_every_field_has_a_flag(self):
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        for name in config_lib.field_names():
            self.assertIn(name, values)
            self.assertIsNone(values[name].default, name)
        self.assertLen(set(config_lib.field_names()),
                       len(config_lib.field_names()))

    def test_unset_flags_keep_defaults(self):
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        values(["prog", "--noise_rate=0.2", "--noise_type=flip"])
        config = flags_lib.config_from_flags(values=values)
        self.assertEqual(config.data.noise_rate, 0.2)
        self.assertEqual(config.data.batch_size,
                         config_lib.DataConfig().batch_size)

    def test_invalid_value_names_the_flag(self):
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        values(["prog", "--imbalance_factor=0.01"])
        with self.assertRaisesRegex(ValueError, "imbalance_factor=0.01"):
            flags_lib.config_from_flags(values=values)

    @parameterized.parameters(*FLAGFILES)
    def test_flagfile_parses_and_validates(self, path):
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        if path.startswith(os.path.join("configs", "tune")):
            flags_lib.define_tune_flags(values)
        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            values(["prog", f"--flagfile={path}"])
        finally:
            os.chdir(cwd)
        config = flags_lib.config_from_flags(values=values)
        self.assertIsInstance(config, config_lib.ExperimentConfig)

    def test_config_json_round_trip(self):
        config = config_lib.ExperimentConfig().replace(noise_rate=0.3,
                                                       noise_type="uniform")
        import json  # pylint: disable=g-import-not-at-top
        again = config_lib.ExperimentConfig.from_dict(
            json.loads(config.to_json()))
        self.assertEqual(again, config)

    def test_unknown_override(self):
        with self.assertRaisesRegex(ValueError, "unknown config fields"):
            config_lib.ExperimentConfig().replace(nosuch=1)


if __name__ == "__main__":
    tf.test.main()
