"""Option schemas: a region is one of the platform's regions, or none."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from configs.schema import REGIONS, GenerateOptions, ServerOptions


@pytest.mark.parametrize(
    "schema, required",
    [(ServerOptions, {"model": "m"}), (GenerateOptions, {"model": "m", "initial_peers": ["p"], "prompt": "x"})],
)
def test_a_region_must_be_one_of_the_platforms_regions(schema, required):
    assert schema(**required, region="europe-west").region == "europe-west"
    assert schema(**required).region == ""
    with pytest.raises(ValidationError, match="unknown region 'mars'.*europe-west"):
        schema(**required, region="mars")
    assert len(REGIONS) == 7 and "oceania" in REGIONS
