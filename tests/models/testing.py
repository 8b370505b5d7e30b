"""Small model configurations shared by the model tests."""

from interp.models.config import ModelConfig

GPT2_LIKE = ModelConfig(
    family="gpt2",
    vocab_size=97,
    d_model=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    mlp_dim=64,
    max_len=64,
)
LLAMA_LIKE = ModelConfig(
    family="llama",
    vocab_size=97,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    norm="rmsnorm",
    activation="silu",
    gated_mlp=True,
    attn_bias=False,
    attn_out_bias=False,
    mlp_bias=False,
    positions="rotary",
    tied_embeddings=False,
)
NEOX_LIKE = ModelConfig(
    family="gpt_neox",
    vocab_size=97,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    mlp_dim=64,
    positions="rotary",
    rotary_fraction=0.25,
    parallel_residual=True,
    activation="gelu",
    tied_embeddings=False,
)
GEMMA2_LIKE = ModelConfig(
    family="gemma2",
    vocab_size=97,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    norm="rmsnorm",
    norm_offset=1.0,
    gated_mlp=True,
    attn_bias=False,
    attn_out_bias=False,
    mlp_bias=False,
    positions="rotary",
    post_norms=True,
    embed_scale=True,
    attn_softcap=50.0,
    final_softcap=30.0,
    sliding_window=4,
    sliding_layers=(0,),
    query_scale=0.25,
)

# Gemma 3's parts (q/k norms, unscaled local rotary, sliding window) with one kv head and
# YaRN on the global layer: the newer options in one config, for generation and hooks.
GEMMA3_LIKE = GEMMA2_LIKE.replace(
    family="gemma3_text",
    num_kv_heads=1,
    qk_norm=True,
    attn_softcap=None,
    final_softcap=None,
    rope_theta=1_000_000.0,
    rope_local_theta=10_000.0,
    rope_scaling="yarn",
    rope_factor=4.0,
    rope_original_max_len=16,
)
QWEN3_LIKE = LLAMA_LIKE.replace(
    family="qwen3", head_dim=12, qk_norm=True, rope_scaling="dynamic", rope_factor=2.0
)

ALL = {"gpt2": GPT2_LIKE, "llama": LLAMA_LIKE, "neox": NEOX_LIKE, "gemma2": GEMMA2_LIKE}
ALL["gemma3"] = GEMMA3_LIKE
