"""The README's demo runs and prints the worked examples with the paper's verdicts."""

import subprocess
import sys


def test_demo_prints_tables():
    out = subprocess.run([sys.executable, "-m", "dppo", "demo"], capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("common token falls"))
    assert "0.1900" in row and row.split()[-6:-3] == ["kept", "masked", "masked"]
    assert all(name in out for name in ("dppo-binary-tv", "cispo", "trm", "relax-both"))
