"""Per-token rows of every site, and TransformerLens names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp.models import hooks, sites
from interp.models.transformer import Transformer, init_params
from tests.models.testing import ALL, GEMMA2_LIKE, GPT2_LIKE, LLAMA_LIKE, NEOX_LIKE


def _acts(config, capture=("*",)):
    model = Transformer(config)
    params = init_params(config, seed=1)
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, config.vocab_size)
    _, acts = hooks.run_with_hooks(model, params, tokens, capture=list(capture))
    return model, params, tokens, acts


@pytest.mark.parametrize("family", sorted(ALL))
def test_rows_of_every_site_round_trip(family):
    config = ALL[family]
    _, _, tokens, acts = _acts(config)
    for name, value in acts.items():
        rows = sites.to_rows(name, value)
        assert rows.shape[:2] == tokens.shape, name
        np.testing.assert_array_equal(sites.from_rows(name, value, rows), value, err_msg=name)
    z = acts["blocks_0/attn/z"]  # [B, T, N, H]: heads side by side, as SAELens's hook_z.
    rows = sites.to_rows("blocks_0/attn/z", z)
    assert rows.shape == (2, 7, config.num_heads * config.head_dim)
    np.testing.assert_array_equal(rows[..., config.head_dim : 2 * config.head_dim], z[:, :, 1])
    k = sites.to_rows("blocks_0/attn/k", acts["blocks_0/attn/k"])
    assert k.shape == (2, 7, config.num_kv_heads * config.head_dim)
    pattern = acts["blocks_0/attn/pattern"]  # [B, N, T, S]: rows per query position.
    rows = sites.to_rows("blocks_0/attn/pattern", pattern)
    assert rows.shape == (2, 7, config.num_heads * 7)
    np.testing.assert_array_equal(rows[1, 3, 2 * 7 : 3 * 7], pattern[1, 2, 3])
    one = sites.to_rows("blocks_0/attn/pattern", pattern, head_index=2)
    np.testing.assert_array_equal(one, pattern[:, 2])


def test_writing_one_head_changes_only_that_head():
    config = LLAMA_LIKE
    model, params, tokens, acts = _acts(config, ["blocks_1/attn/z", "blocks_1/attn_out"])
    z = acts["blocks_1/attn/z"]
    rows = sites.to_rows("blocks_1/attn/z", z, head_index=3)
    assert rows.shape == (2, 7, config.head_dim)
    written = sites.from_rows("blocks_1/attn/z", z, jnp.zeros_like(rows), head_index=3)
    np.testing.assert_array_equal(written[:, :, :3], z[:, :, :3])
    np.testing.assert_array_equal(written[:, :, 3], 0.0)
    # Zeroing head 3 through an intervention removes exactly its share of attn_out.
    ablate = sites.row_intervention("blocks_1/attn/z", jnp.zeros_like, head_index=3)
    _, ablated = hooks.run_with_hooks(
        model, params, tokens, capture=["blocks_1/attn_out"],
        interventions={"blocks_1/attn/z": ablate},
    )  # fmt: skip
    share = jnp.einsum("BTH,HD->BTD", z[:, :, 3], params["blocks_1"]["attn"]["o_kernel"][3])
    np.testing.assert_allclose(
        ablated["blocks_1/attn_out"], acts["blocks_1/attn_out"] - share, atol=1e-5
    )


@pytest.mark.parametrize(
    "name, value_shape, kwargs, message",
    [
        ("blocks_0/resid_post", (2, 7, 32), dict(head_index=0), "no heads axis"),
        ("blocks_0/attn/z", (2, 7, 4, 8), dict(head_index=4), "outside 0..3"),
        ("blocks_0/attn/z", (2, 7, 4, 8), dict(rows=(2, 7, 8)), "gives rows of shape"),
        ("final_norm", (7, 32), {}, "not \\[B, T, ...\\]"),
    ],
)
def test_layout_errors_name_the_problem(name, value_shape, kwargs, message):
    value = jnp.zeros(value_shape)
    with pytest.raises(ValueError, match=message):
        if "rows" in kwargs:
            sites.from_rows(name, value, jnp.zeros(kwargs["rows"]))
        else:
            sites.to_rows(name, value, **kwargs)


@pytest.mark.parametrize("family", sorted(ALL))
def test_transformer_lens_names_resolve_to_the_same_sites(family):
    config = ALL[family]
    model = Transformer(config)
    for ours in hooks.hook_names(model):
        try:
            tl = sites.to_transformer_lens(ours, config)
        except ValueError:
            continue  # e.g. mlp/in: TransformerLens has no hook there.
        assert hooks.resolve(model, [tl]) == [ours], (ours, tl)
    assert hooks.resolve(model, ["blocks.*.hook_resid_post"]) == [
        f"blocks_{i}/resid_post" for i in range(config.num_layers)
    ]
    assert sites.to_transformer_lens("blocks_1/mlp/out") == "blocks.1.hook_mlp_out"
    assert sites.to_transformer_lens("ln_f/normalized") == "ln_final.hook_normalized"


def test_transformer_lens_names_that_differ_here_are_refused():
    rotary = Transformer(LLAMA_LIKE)
    with pytest.raises(sites.UnknownTransformerLensName, match="before the rotary embedding"):
        hooks.resolve(rotary, ["blocks.0.attn.hook_q"])
    # Without rotary embeddings hook_q is after the projection, as attn/q.
    assert hooks.resolve(Transformer(GPT2_LIKE), ["blocks.0.attn.hook_q"]) == ["blocks_0/attn/q"]
    with pytest.raises(ValueError, match="hook_embed.*accepted are: .*hook_resid_post"):
        hooks.resolve(rotary, ["hook_embed"])
    with pytest.raises(ValueError, match="has no TransformerLens hook name"):
        sites.to_transformer_lens("blocks_0/mlp/in")
    # hook_mlp_in is the MLP's input before its norm: resid_mid, or resid_pre when parallel.
    assert hooks.resolve(rotary, ["blocks.1.hook_mlp_in"]) == ["blocks_1/resid_mid"]
    parallel = Transformer(NEOX_LIKE)
    assert hooks.resolve(parallel, ["blocks.1.hook_mlp_in"]) == ["blocks_1/resid_pre"]
    assert sites.depends_on_model("blocks.1.hook_mlp_in")
    assert not sites.depends_on_model("blocks.1.hook_mlp_out")
    with pytest.raises(ValueError, match=r"Did you mean \['blocks.0.hook_resid_post'"):
        hooks.resolve(rotary, ["blocks.0.hook_resid_psot"])
    # Gemma's post-norm sites have their TransformerLens names.
    model = Transformer(GEMMA2_LIKE)
    assert hooks.resolve(model, ["blocks.1.ln2_post.hook_normalized"]) == [
        "blocks_1/post_mlp_norm/normalized"
    ]


@pytest.mark.parametrize(
    "name, other, config, same",
    [
        ("blocks_1/resid_post", "blocks.1.hook_resid_post", None, True),
        ("blocks.0.attn.hook_z", "blocks_0/attn/z", None, True),
        ("ln_final.hook_normalized", "ln_f/normalized", None, True),
        ("blocks_1/resid_post", "blocks_0/resid_post", None, False),
        ("blocks_1/resid_post", "blocks.1.hook_resid_pre", None, False),
        # hook_mlp_in is resid_pre under a parallel residual: either, without the model.
        ("blocks.2.hook_mlp_in", "blocks_2/resid_pre", None, True),
        ("blocks.2.hook_mlp_in", "blocks_2/resid_pre", NEOX_LIKE, True),
        ("blocks.2.hook_mlp_in", "blocks_2/resid_pre", LLAMA_LIKE, False),
        ("blocks.2.hook_mlp_in", "blocks_2/resid_mid", LLAMA_LIKE, True),
        ("blocks.2.hook_mlp_in", "blocks_2/resid_mid", None, True),
        ("blocks.2.hook_nonsense", "blocks_2/resid_pre", None, False),
    ],
)
def test_same_site_compares_sites_not_spellings(name, other, config, same):
    assert sites.same_site(name, other, config) is same
    assert sites.same_site(other, name, config) is same
