"""DiskStore: a round's updates on disk, read back tensor by tensor exactly as they were put (0-d tensors too)."""

from __future__ import annotations

import numpy as np
import pytest

from fedseg.errors import FedsegError
from fedseg.federation.deploy.spool import DiskStore
from fedseg.federation.strategies import WeightedMean
from fedseg.federation.strategies import Update


def test_round_trip_keeps_shapes_and_dtypes_and_clear_removes_the_folder(tmp_path):
    store = DiskStore(tmp_path / "incoming")
    weights = {"bn.num_batches_tracked": np.array(7, np.int64), "w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    store.put("nci", weights)
    assert (tmp_path / "incoming").stat().st_mode & 0o777 == 0o700
    for name, array in weights.items():
        back = store.get("nci", name)
        assert back.shape == array.shape and back.dtype == array.dtype and np.array_equal(back, array)
    store.clear()
    assert not (tmp_path / "incoming").exists()
    with pytest.raises(FedsegError, match="cannot name a spool file"):
        store.put("../etc", weights)


def test_an_aggregator_over_a_disk_store_gives_what_it_gives_in_memory(tmp_path):
    g = {"w": np.zeros(4, np.float32), "steps": np.array(0, np.int64)}
    updates = [Update(s, {"w": np.full(4, v, np.float32), "steps": np.array(i, np.int64)}, 10, 0.5)
               for i, (s, v) in enumerate([("a", 1.0), ("b", 2.0), ("c", 4.0)])]

    def run(aggregator):
        aggregator.start_round(g)
        for u in updates:
            aggregator.add(u)
        return aggregator.finish().weights

    on_disk, in_memory = run(WeightedMean("uniform", store=DiskStore(tmp_path / "x"))), run(WeightedMean("uniform"))
    for name in g:
        assert on_disk[name].shape == in_memory[name].shape == g[name].shape
        assert np.array_equal(on_disk[name], in_memory[name])
