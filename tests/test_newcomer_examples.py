"""examples/ as a newcomer runs them (NEWCOMER audit): a second run of examples/fsdp2.py overwrote the first one's
optimizer checkpoint at a fixed /tmp path (torch's "Detected an existing checkpoint ... overwriting" warning on both
ranks); each run now writes a folder of its own."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "fsdp2.py"


@pytest.mark.slow
def test_fsdp2_example_runs_twice_into_folders_of_their_own(tmp_path):
    """Two runs (2 processes each, 20 s a run) with TMPDIR in tmp_path: two checkpoint folders, no overwrite."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    paths = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "existing checkpoint" not in proc.stderr, proc.stderr[-3000:]
        paths += re.findall(r"optimizer checkpoint in (\S+)", proc.stdout)
    assert len(paths) == 2 and paths[0] != paths[1], paths
    assert all(Path(p).is_dir() and Path(p).parent == tmp_path and any(Path(p).iterdir()) for p in paths), paths
