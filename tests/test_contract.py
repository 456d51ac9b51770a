"""Every registered merge method holds the contract of `blockmerge.testing`."""

from __future__ import annotations

import pytest

from blockmerge.plugins import registry
from blockmerge.testing import CONTRACTS, dask_equals_local

METHODS = sorted(registry())


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", METHODS)
def test_every_method_holds_the_contract(name, contract, tmp_path):
    contract(registry()[name], tmp_path)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_merges_on_dask_as_it_does_locally(name, cluster, tmp_path):
    dask_equals_local(registry()[name], tmp_path, cluster[0].scheduler_address)
