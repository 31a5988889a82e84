#!/usr/bin/env python
"""Build the demo MoE GGUF (SmolLM2-135M upcycled to 4 experts, top-2) into the cache.

Example: python scripts/make_demo_model.py            # prints the cached path
         python scripts/make_demo_model.py --experts 8 --used 2 --out /tmp/demo8.gguf
"""
import sys
from pathlib import Path

# Let the script run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hetero_moe.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
