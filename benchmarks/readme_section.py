"""Put a markdown file's text into benchmarks/README.md between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` (the figures speed.py and gpu.sh write).

    python benchmarks/readme_section.py cpu benchmarks/speed.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: readme_section.py NAME FILE.md [README.md]")
    B.replace_section(sys.argv[1], Path(sys.argv[2]).read_text(),
                      Path(sys.argv[3]) if len(sys.argv) == 4 else B.README)
