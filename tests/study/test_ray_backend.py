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


def test_a_bad_config_on_ray_is_typed_and_leaves_the_folder_as_it_was(make_config, tmp_path):
    """The actors refuse a bad intervention: the driver raises its InterventionError (not
    Ray's ActorDiedError), and with force_recompute the stored records and study.json are as
    they were. The baseline: the good config then runs on Ray."""
    from pyro_lmscm.errors import InterventionError

    config = make_config(limit=2, batch_size=2)
    run_study(config)
    files = {path.name: path.read_bytes() for path in config.output_dir.iterdir()}
    with pytest.raises(InterventionError, match="bogus"):
        run_study(make_config(limit=2, batch_size=2, ray=True, num_workers=1, intervention="bogus=1",
                              force_recompute=True))
    assert {path.name: path.read_bytes() for path in config.output_dir.iterdir()} == files
    assert not ray.is_initialized()
    again = run_study(make_config(limit=2, batch_size=2, ray=True, num_workers=1, num_samples=2,
                                  force_recompute=True))
    assert again.computed == 2 and again.recomputed == 2
