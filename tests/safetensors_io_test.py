"""interp/safetensors_io.py against the reference `safetensors` library, local and gs://."""

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from interp import safetensors_io

TENSORS = {
    "scalar": np.array(3.5, np.float32),
    "matrix": np.arange(12, dtype=np.float32).reshape(3, 4),
    "ints": np.arange(5, dtype=np.int64),
    "mask": np.array([True, False, True]),
    "empty": np.zeros((0, 3), np.float16),
}


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].shape == np.shape(value), name
        np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)


def test_round_trip_with_the_reference_library_both_ways(tmp_path):
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    safetensors_io.write(ours, TENSORS)
    _assert_same(safetensors.numpy.load_file(ours), TENSORS)  # Shapes kept, scalars too.
    safetensors.numpy.save_file(TENSORS, theirs)
    _assert_same(safetensors_io.read(theirs), TENSORS)


def test_bfloat16_and_big_endian_inputs(tmp_path):
    bf16 = np.array([1.5, -2.0, 3.25], ml_dtypes.bfloat16)
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    safetensors_io.write(tmp_path / "t.safetensors", {"bf16": bf16, "big": big})
    got = safetensors_io.read(tmp_path / "t.safetensors")
    assert got["bf16"].dtype == ml_dtypes.bfloat16 and got["big"].dtype == np.float32
    np.testing.assert_array_equal(got["bf16"], bf16)
    np.testing.assert_array_equal(got["big"], big.astype(np.float32))


@pytest.mark.parametrize(
    "damage, message",
    [(lambda b: b[:5], "under 8"), (lambda b: b[:-4], "truncated"), (lambda b: b[:20], "truncated"),
     (lambda b: (10**12).to_bytes(8, "little") + b[8:], "header length"),
     (lambda b: b[:8] + b"{" * (len(b) - 8), "bad header")],
)  # fmt: skip
def test_damaged_files_are_value_errors_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "t.safetensors"
    safetensors_io.write(path, {"x": np.ones((4, 4), np.float32)})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as error:
        safetensors_io.read(path)
    assert "t.safetensors" in str(error.value)


def test_gs_round_trip(gcs_bucket):
    url = f"{gcs_bucket}/sae/weights.safetensors"
    safetensors_io.write(url, TENSORS)
    _assert_same(safetensors_io.read(url), TENSORS)
