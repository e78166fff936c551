"""Package data (FID reference statistics). The MNIST readers live in diffpro_cli.mnist (re-exported here)."""

from diffpro_cli.mnist import default_mnist_dir, load_mnist, read_idx, to_model_space, to_uint8  # noqa: F401
