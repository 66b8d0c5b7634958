"""Regenerate the golden regression outputs in tests/fixtures/golden/ (run only on purpose).

Fixed-seed tiny models and inputs; the stored outputs pin the numerics so no later speed work
can drift them unnoticed. Usage: python scripts/make_golden.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from golden_cases import CASES, compute_case  # noqa: E402


def main() -> None:
    out = REPO / "tests" / "fixtures" / "golden"
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for name in CASES:
        for key, value in compute_case(name).items():
            arrays[f"{name}/{key}"] = value.numpy()
    np.savez_compressed(out / "outputs.npz", **arrays)
    # The plain model runs torch's own kernels only: no per-machine kernel choice to record.
    meta = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cases": list(CASES)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(arrays)} arrays to {out}")


if __name__ == "__main__":
    main()
