"""Harvesting activations at hook sites and mixing them in a shuffle buffer."""

import ml_dtypes
import numpy as np
import pytest

from interp import parallel
from interp.data import activations
from interp.models import hooks
from tests.data import testing
from tests.data.testing import BOS, CONFIG, PAD, SITES, random_tokens


@pytest.fixture(scope="module")
def model_and_params():
    return testing.model_and_params()


# ---------------------------------------------------------------------------- harvesting


def test_keep_mask_by_hand():
    tokens = np.array([[BOS, 5, 6, BOS, 7], [BOS, 5, 6, PAD, PAD], [PAD, PAD, 8, 9, 10]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(
        activations.keep_mask(tokens, mask, bos_id=BOS),
        [[0, 1, 1, 0, 1], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1]],
    )
    # skip_first drops the first *real* token of each row, also under left padding.
    np.testing.assert_array_equal(
        activations.keep_mask(tokens, mask, skip_first=True),
        [[0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]],
    )
    np.testing.assert_array_equal(activations.keep_mask(tokens), np.ones((3, 5), bool))


def test_harvest_equals_direct_capture_at_kept_positions(model_and_params):
    model, params = model_and_params
    batches = []
    for seed in range(2):
        tokens = random_tokens(seed)
        tokens[:, 0] = BOS
        tokens[0, 4] = BOS  # A second document starting inside a packed row.
        mask = np.ones_like(tokens)
        mask[1, 5:] = 0  # Right padding.
        mask[2, :2] = 0  # Left padding.
        tokens[mask == 0] = PAD
        batches.append((tokens, mask))

    got = list(activations.harvest(model, params, batches, SITES, bos_id=BOS))

    assert len(got) == 2
    for (tokens, mask), out in zip(batches, got, strict=True):
        _, want = hooks.run_with_hooks(model, params, tokens, capture=SITES, attention_mask=mask)
        keep = (mask == 1) & (tokens != BOS)
        # Row 0: 8 tokens - 2 BOS; row 1: 5 real - 1 BOS; row 2: 6 real (its BOS was padded).
        assert keep.sum() == 6 + 4 + 6
        for site in SITES:
            assert out[site].dtype == np.float32
            assert out[site].shape == (keep.sum(), CONFIG.d_model)
            np.testing.assert_allclose(out[site], np.asarray(want[site])[keep], atol=1e-5)


def test_harvest_pad_id_and_skip_first(model_and_params):
    model, params = model_and_params
    tokens = random_tokens(5)
    tokens[0, 6:] = PAD
    (out,) = activations.harvest(
        model, params, [tokens], ["blocks_1/resid_pre"], pad_id=PAD, skip_first=True
    )
    mask = (tokens != PAD).astype(np.int32)
    _, want = hooks.run_with_hooks(
        model, params, tokens, capture=["blocks_1/resid_pre"], attention_mask=mask
    )
    keep = mask.astype(bool)
    keep[:, 0] = False
    assert out["blocks_1/resid_pre"].shape == (5 + 7 + 7, CONFIG.d_model)
    np.testing.assert_allclose(
        out["blocks_1/resid_pre"], np.asarray(want["blocks_1/resid_pre"])[keep], atol=1e-5
    )


def test_a_pad_id_that_is_also_the_bos_never_swallows_the_bos(model_and_params):
    # One id for BOS and padding (the demo's tokenizer: BOS = EOS = pad), unpadded rows that
    # start with BOS and no mask: the leading BOS used to be taken for padding and masked out
    # of attention, so every harvested row differed from the model's own activations.
    model, params = model_and_params
    tokens = random_tokens(11)
    tokens[:, 0] = PAD  # The BOS, which here is the pad id too.
    with pytest.raises(ValueError, match=r"pad_id=0 is also a token .* attention_mask"):
        list(activations.harvest(model, params, [tokens], SITES, bos_id=PAD, pad_id=PAD))
    _, want = hooks.run_with_hooks(model, params, tokens, capture=SITES)
    keep = tokens != PAD
    for item, pad_id in (((tokens, np.ones_like(tokens)), PAD), (tokens, None)):
        # With the tokenizer's mask, or without pad_id for unpadded rows: the model's own.
        (out,) = activations.harvest(model, params, [item], SITES, bos_id=PAD, pad_id=pad_id)
        for site in SITES:
            np.testing.assert_allclose(out[site], np.asarray(want[site])[keep], atol=1e-5)
    # A dedicated pad token is still read from the ids: both ends, never inside the text.
    padded = tokens.copy()
    padded[0, -2:] = BOS  # BOS stands for a dedicated pad id here (bos_id is PAD).
    _, mask = activations.split_batch(padded, BOS, text_ids=(PAD,))
    np.testing.assert_array_equal(mask[0], [1] * 6 + [0, 0])
    assert mask[1:].all()


def test_no_consumer_infers_padding_from_ids_without_being_asked():
    # Rows that start and end with what a tokenizer pads with are all real without pad_id:
    # feature statistics, steering maxima and SAE evaluation read batches this way.
    tokens = np.array([[PAD, 5, 6, PAD], [PAD, PAD, 7, 8]])
    got, mask = activations.split_batch(tokens)
    np.testing.assert_array_equal(got, tokens)
    assert mask.all()
    _, mask = activations.split_batch({"tokens": tokens, "attention_mask": np.ones_like(tokens)},
                                      PAD, text_ids=(PAD,))  # fmt: skip
    assert mask.all()  # A given mask is never second-guessed from the ids.
    with pytest.raises(ValueError, match="pad_id=0 is also a token"):
        activations.padding_from_ids(tokens, PAD, text_ids=(None, PAD))
    np.testing.assert_array_equal(
        activations.padding_from_ids(tokens, PAD, text_ids=(None,)), [[0, 1, 1, 0], [0, 0, 1, 1]]
    )


def test_harvest_sites_align_row_by_row(model_and_params):
    model, params = model_and_params
    tokens = random_tokens(7)
    tokens[:, 0] = BOS
    tokens[1, 3] = BOS
    (out,) = activations.harvest(
        model,
        params,
        [tokens],
        ["blocks_1/resid_pre", "blocks_0/resid_post", "blocks_0/attn/z"],
        bos_id=BOS,
        dtype=ml_dtypes.bfloat16,
    )
    # blocks_1/resid_pre is blocks_0/resid_post: rows match exactly iff they are aligned.
    np.testing.assert_array_equal(out["blocks_1/resid_pre"], out["blocks_0/resid_post"])
    assert out["blocks_0/resid_post"].dtype == ml_dtypes.bfloat16
    assert out["blocks_0/attn/z"].shape == (3 * 8 - 4, CONFIG.num_heads * CONFIG.head_dim)


def test_harvest_on_a_mesh_matches_unsharded(model_and_params):
    model, params = model_and_params
    tokens = np.concatenate([random_tokens(8), random_tokens(9), random_tokens(10)[:2]])  # B = 8.
    mesh = parallel.make_mesh(data=4, model=2)
    (plain,) = activations.harvest(model, params, [tokens], SITES, skip_first=True)
    (sharded,) = activations.harvest(model, params, [tokens], SITES, skip_first=True, mesh=mesh)
    for site in SITES:
        np.testing.assert_allclose(sharded[site], plain[site], atol=1e-5)


# ---------------------------------------------------------------------------- shuffling


def _sequence_stream(num_sequences=32, length=16, d=4):
    """One item per sequence; 'row' is a global row id, 'seq' the sequence id."""
    for s in range(num_sequences):
        rows = np.arange(s * length, (s + 1) * length)
        yield {
            "x": np.repeat(rows[:, None], d, axis=1).astype(np.float32),
            "row": rows,
            "seq": np.full(length, s),
        }


def test_shuffle_buffer_mixes_and_returns_each_row_once():
    buffer = activations.ShuffleBuffer(_sequence_stream(), capacity=128, seed=0)
    batches = list(buffer.iterate(16))

    assert len(batches) == 32  # 512 rows, all drained.
    rows = np.concatenate([b["row"] for b in batches])
    np.testing.assert_array_equal(np.sort(rows), np.arange(512))  # Each row exactly once.
    for b in batches:  # Keys stay aligned.
        np.testing.assert_array_equal(b["x"][:, 0], b["row"])
        np.testing.assert_array_equal(b["row"] // 16, b["seq"])
    # An unshuffled batch of 16 rows comes from 1 sequence; the buffer holds 8.
    assert len(np.unique(batches[0]["seq"])) >= 5
    assert np.mean([len(np.unique(b["seq"])) for b in batches[:16]]) >= 5
    assert not np.array_equal(rows, np.arange(512))


def test_shuffle_buffer_is_deterministic_and_refills():
    def run(seed):
        buffer = activations.ShuffleBuffer(_sequence_stream(), capacity=64, seed=seed)
        out = []
        for _ in range(10):
            out.append(buffer.get(8)["row"])
            assert len(buffer) >= 32 - 8  # Drawn from >= half full while the stream lasts.
        return np.concatenate(out)

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))
    # After 10 draws of 8 the buffer has refilled past the first 64 rows.
    assert run(1).max() >= 64


def test_shuffle_buffer_takes_items_larger_than_capacity():
    big = [{"v": np.arange(100)}, {"v": np.arange(100, 150)}]
    buffer = activations.ShuffleBuffer(big, capacity=32, seed=0)
    rows = np.concatenate([b["v"] for b in buffer.iterate(10)])
    assert len(rows) == 150 and len(np.unique(rows)) == 150


# ---------------------------------------------------------------------------- cache
