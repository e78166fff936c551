"""bench's FID feature cache and --compile: a compiled run samples with other kernels, so it must not
read an eager run's features (and the other way round)."""


from diffpro_cli.stages import bench as B
from diffpro_cli.stages.context import StageContext




def test_a_compiled_run_does_not_reuse_an_eager_runs_fid_features(tmp_path, stand_in_inception, monkeypatch):
    """Catches: the feature-cache key held the row, steps, sampler and seed but not --compile, so
    `bench --fid --compile` after `bench --fid` in the same workdir reported the eager samples' FID
    for rows that ran compiled (the oneDNN int8 path rounds differently) without sampling once."""
    computed = []  # Inception passes over a row's FID set
    from diffpro_cli.metrics import fid

    real_features = fid.inception_features

    def counted(images, *args, **kwargs):   # a row's FID set goes through Inception; cached features do not
        computed.append("fid set")
        return real_features(images, *args, **kwargs)

    monkeypatch.setattr(fid, "inception_features", counted)
    monkeypatch.setattr(B, "compile_rows", lambda rows, device="cpu": "compiled (stand-in: the eager modules)")
    cfg = B.BenchConfig(rows=["fp32"], reference_steps=2, repeats=1, latency_batch=1, fid=True, fid_n=3,
                        memory=False, sample_batch=3)
    B.measure_bench(StageContext.create("builtin:dit-mnist", tmp_path), cfg)
    assert "fid set" in computed                      # the eager run sampled its FID set
    computed.clear()
    B.measure_bench(StageContext.create("builtin:dit-mnist", tmp_path), cfg)
    assert "fid set" not in computed                  # the same eager run again: read from the cache
    cfg.compile = True
    B.measure_bench(StageContext.create("builtin:dit-mnist", tmp_path), cfg)
    assert "fid set" in computed                      # compiled: sampled anew, not the eager features
