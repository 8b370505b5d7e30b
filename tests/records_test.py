"""Strict config records: a misspelt field is named, not ignored."""

import pytest

from interp.models.config import ModelConfig
from interp.sae.modules import SAEConfig


@pytest.mark.parametrize("cls", [ModelConfig, SAEConfig])
def test_from_dict_round_trips_and_names_unknown_fields(cls):
    default = cls()
    assert cls.from_dict(default.to_dict()) == default
    with pytest.raises(ValueError, match=rf"Unknown {cls.__name__} field\(s\) \['d_modle'\]"):
        cls.from_dict({**default.to_dict(), "d_modle": 3})
