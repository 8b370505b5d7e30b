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

ALL = {"gpt2": GPT2_LIKE, "llama": LLAMA_LIKE, "neox": NEOX_LIKE, "gemma2": GEMMA2_LIKE}
