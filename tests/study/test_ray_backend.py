"""The same study on a local Ray instance with two workers gives the local run's records."""

import pytest

from pyro_lmscm.study import run_study

ray = pytest.importorskip("ray", reason="the Ray backend is optional: pip install 'pyro-lmscm[ray]'")


def test_ray_equals_local(make_config, tmp_path):
    local = run_study(make_config(output=str(tmp_path / "local"), batch_size=2))
    # a third of it first (so the Ray run also resumes, and the limit cuts a batch), then the
    # rest on two workers in shards of 3 strings (rounded up to whole batches of 2)
    run_study(make_config(output=str(tmp_path / "ray"), limit=3, batch_size=2))
    on_ray = run_study(make_config(output=str(tmp_path / "ray"), ray=True, num_workers=2, shard_size=3, batch_size=2))
    assert on_ray.skipped == 3 and on_ray.computed == 6
    assert on_ray.records == local.records
    assert not ray.is_initialized()  # the backend shuts down the instance it started
