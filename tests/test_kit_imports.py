"""``lowmem.kit`` and ``lowmem.train`` import without ``datasets`` and ``trl`` (the GPU device image has neither:
.ci/gpu_checks.sh collects the CUDA tests there, and tests/test_endrun_memory.py / the ``tiny_model_path`` fixture
import them); a dataset is built, and ``datasets`` imported, only where a task asks for one."""

import subprocess
import sys


def test_kit_and_train_import_without_datasets_and_trl():
    code = ("import sys; sys.modules['datasets'] = None; sys.modules['trl'] = None\n"
            "import lowmem.kit, lowmem.train\n"
            "from lowmem.kit import save_tiny_model, build_tokenizer\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_the_tasks_still_build_datasets():
    from datasets import Dataset

    from lowmem.kit import preference_dataset, sft_dataset

    assert isinstance(sft_dataset(4), Dataset) and isinstance(preference_dataset(4), Dataset)
