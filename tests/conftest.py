"""Shared test set-up: 8 fake CPU devices for sharding tests, offline Hugging Face."""

import os

# Must happen before jax is imported anywhere: every test process sees 8 CPU devices, so
# sharded and unsharded code paths run side by side.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
