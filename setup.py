"""GPTSAN: a general-purpose Japanese language model on a Switch Transformer (Mesh-TensorFlow)."""
from setuptools import find_packages, setup

# Pinned stack (docs/ARCHITECTURE.md "Stack"): TF 2.15.1 is the last release with
# tf.estimator/TPUEstimator.
INSTALL_REQUIRES = [
    "tensorflow-cpu==2.15.1; platform_machine == 'x86_64'",
    "tensorflow==2.15.1; platform_machine != 'x86_64'",
    "tensorflow-estimator==2.15.0",
    "mesh-tensorflow==0.1.21",
    "numpy<2",
    "tqdm>=4.60",
    "safetensors>=0.4",  # HF checkpoint conversion (numpy API, no torch needed)
]

EXTRAS_REQUIRE = {
    # GPU training/inference: CUDA 12.2 wheels.
    "gpu": ["tensorflow[and-cuda]==2.15.1"],
    # The test suite: the HF port is the independent reference implementation of the model.
    "test": [
        "pytest>=7",
        "pytest-timeout",
        "hypothesis>=6",
        "torch==2.13.0",
        "transformers==4.40.2",
        "wordfreq==3.1.1",  # the vocabulary builder's tests rebuild from it
    ],
    # Rebuilding the vocabulary from public Japanese data (make vocab).
    "vocab": ["wordfreq==3.1.1"],
}

setup(
    name="gptsan",
    version="0.1.0",
    description=__doc__,
    license="MIT",
    python_requires=">=3.9,<3.12",
    packages=find_packages(include=["gptsan", "gptsan.*"]),
    py_modules=["run_train", "run_generate", "run_languagemodel", "encode_swe"],
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "gptsan-encode=encode_swe:main",
        ],
    },
)
