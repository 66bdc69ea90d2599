"""moejax: Mixture-of-Experts language models in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="moejax",
    version="0.1.0",
    description="Train Mixture-of-Experts language models in JAX/Flax on TPU, GPU or CPU.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["moejax", "moejax.*"]),
    package_data={"moejax": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.9",
        "importlib_resources",  # tfds reads ArrayRecord without TensorFlow only with this present
        "sentencepiece>=0.2",
        "chex>=0.1.90",
        "pyyaml>=6",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "numpy",
        "scipy",  # linear_sum_assignment: MC-SMoE weight matching of expert hidden units (moejax.compress.merge)
        "safetensors>=0.4.5",  # Hugging Face checkpoints through its numpy API (bf16 via ml_dtypes), no torch
        "ml_dtypes",  # bfloat16 for numpy (a jax dependency; imported directly by moejax.interop)
        "matplotlib>=3.7",  # moejax.analyze: routing plots (Agg backend, no display)
        "tokenizers>=0.20",  # checkpoints' own tokenizer.json files, run as transformers' fast tokenizers run them
        "jinja2>=3.1.6",  # chat templates rendered as transformers does (sandboxed; 3.1.6 fixes sandbox escapes)
        "pyarrow>=14",  # parquet data sources (row groups read lazily), as Hugging Face datasets ship them
        "grain>=0.2.10",  # the JAX ecosystem's loader (as MaxText): read-ahead threads for tokenizing + masking
    ],
    extras_require={
        # notebooks run in tests; lm_eval: the [eval] extra is tested in CI too
        "test": ["pytest>=8", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6", "lm_eval>=0.4,<0.5"],
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
        "eval": ["lm_eval>=0.4,<0.5"],  # python -m moejax.evaluate --lm-eval-tasks: the standard harness
    },
)
