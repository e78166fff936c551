"""Quality metrics: FID (pytorch-fid numerics, offline Inception weights)."""
