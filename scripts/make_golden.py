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

from golden_cases import CASES, build_case  # noqa: E402


def main() -> None:
    out = REPO / "tests" / "fixtures" / "golden"
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for name in CASES:
        model, images, ids = build_case(name)
        with torch.no_grad():
            arrays[f"{name}/image"] = model.encode_image(images).numpy()
            arrays[f"{name}/text"] = model.encode_text(ids).numpy()
            arrays[f"{name}/logits"] = model(images, ids)[0].numpy()
    np.savez_compressed(out / "outputs.npz", **arrays)
    from clipforge.models.linear import onednn_linear_is_faster

    meta = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "linear_backend": "onednn" if onednn_linear_is_faster() else "torch", "cases": list(CASES)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(arrays)} arrays to {out}")


if __name__ == "__main__":
    main()
