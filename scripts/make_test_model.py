#!/usr/bin/env python
"""Write a random-weight GGUF test model. See `python scripts/make_test_model.py --help`.

Example: python scripts/make_test_model.py --arch qwen3moe --preset tiny --out /tmp/q3.gguf
Shape-only (real metadata and tensor table, sparse data):
    python scripts/make_test_model.py --preset deepseek-r1 --shape-only --out R1.gguf
"""
import sys
from pathlib import Path

# Let the script run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hetero_moe.testing.make_model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
