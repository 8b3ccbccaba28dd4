"""Install step: put tiktoken's BPE files where the gateway reads them, so nothing downloads at run time.

The files come from a pinned, hash-checked PyPI wheel (bpe-openai, MIT), fetched with pip at
install time; tiktoken verifies each file's sha256 again when it loads it.
Usage: python scripts/fetch_tokenizers.py [--wheel-dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEST = Path(__file__).resolve().parent.parent / "gateway" / "tokenizers"
WHEEL = "bpe-openai==0.1.4"
# name -> (tiktoken cache file name = sha1 of the blob URL, expected sha256)
FILES = {
    "o200k_base": (
        "fb374d419588a4632f3f557e76b4b70aebbca790",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wheel-dir", help="a folder already holding the wheel")
    args = parser.parse_args()
    if all((DEST / cache_name).exists() for cache_name, _ in FILES.values()):
        print("tokenizers: already installed")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = Path(args.wheel_dir or tmp)
        if not list(wheel_dir.glob("bpe_openai-*.whl")):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheel_dir), WHEEL],
                check=True,
            )
        wheel = next(wheel_dir.glob("bpe_openai-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for name, (cache_name, sha256) in FILES.items():
                data = gzip.decompress(zf.read(f"bpe_openai/data/{name}.tiktoken.gz"))
                digest = hashlib.sha256(data).hexdigest()
                if digest != sha256:
                    print(f"tokenizers: {name} has sha256 {digest}, expected {sha256}", file=sys.stderr)
                    return 1
                (DEST / cache_name).write_bytes(data)
                print(f"tokenizers: installed {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
