"""bench --fid --reference FILE that is not 2048-d FID statistics: one error line before anything is
sampled, exit 3, no report (a stand-in Inception network: no weights needed)."""

import numpy as np
import pytest




@pytest.mark.parametrize("make, needle", [
    # catches: np.load of a .npy returns an array, and `with array:` raised TypeError (a traceback, exit 1)
    (lambda p: np.save(p, np.zeros(3)), "not an .npz"),
    # catches: 64-d statistics accepted, then every row sampled and FID'd before a numpy broadcast
    # error (a traceback after minutes of work)
    (lambda p: np.savez(p, mu=np.zeros(64), sigma=np.eye(64)), "64-d"),
    # catches: mu and sigma that disagree in size accepted the same way
    (lambda p: np.savez(p, mu=np.zeros(2048), sigma=np.eye(3)), "not a mean and its covariance"),
    # catches: NaN statistics (a broken fid-stats run) accepted, then every FID NaN and the bootstrap's
    # "no finite bootstrap replicates" ValueError after sampling
    (lambda p: np.savez(p, mu=np.zeros(2048), sigma=np.full((2048, 2048), np.nan)), "NaN"),
], ids=["npy", "wrong-width", "mismatched", "nan"])
def test_bench_refuses_a_reference_that_is_not_inception_statistics(cli, tmp_path, stand_in_inception, make, needle):
    ref = tmp_path / "ref.npy" if needle == "not an .npz" else tmp_path / "ref.npz"
    make(ref)
    rc, _, err = cli("bench", "builtin:dit-mnist", "--rows", "fp32", "--fid", "--fid-n", 2, "--reference", ref,
                     "--repeats", 1, "--latency-batch", 1, "--reference-steps", 2, "-w", tmp_path / "w")
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("bench:")]
    assert rc == 3 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert not (tmp_path / "w" / "bench" / "report.json").exists()
