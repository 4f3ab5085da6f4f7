"""lfm_tf: multilevel optimisation in training (Learning From Mistakes)."""

import setuptools

# Pinned to the set measured to co-install (research/tf_stack.md §1). The full
# `tensorflow` wheel, not `tensorflow-cpu`: tensorflow-serving-api requires the
# `tensorflow` distribution, and mixing the two corrupts site-packages.
INSTALL_REQUIRES = [
    "tensorflow==2.21.0",
    "keras==3.15.1",
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",
    "keras-tuner[bayesian]==1.4.8",
    "tensorboard==2.21.0",
    "scipy==1.17.1",
    "absl-py==2.5.1",
    "scikit-learn==1.9.1",
    "tensorflow-serving-api==2.21.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "h5py==3.14.0",
    "matplotlib==3.11.2",  # pipelines.benchmark's plots (Agg backend).
]

setuptools.setup(
    name="lfm_tf",
    version="0.1.0",
    description=(
        "Learning From Mistakes and multilevel optimisation for TensorFlow/Keras"
    ),
    packages=setuptools.find_packages(
        include=["lfm_tf", "lfm_tf.*", "pipelines", "pipelines.*", "serving",
                 "serving.*"]
    ),
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0"],
    },
)
