"""All-or-nothing loading of a state dict, with an error that lists every problem at once."""

from __future__ import annotations

import torch


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it describes (missing/unexpected keys, shapes)."""


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load all-or-nothing, with an error listing every missing/unexpected key and shape mismatch."""
    own = model.state_dict()
    # BatchNorm's step counter is bookkeeping, not weights: tolerate its absence.
    missing = [k for k in sorted(set(own) - set(sd)) if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sorted(set(sd) - set(own)) if not k.endswith("num_batches_tracked")]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{source} does not fit the model"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:20])}" + (" ..." if len(keys) > 20 else ""))
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes[:20]))
        raise CheckpointError("\n  ".join(parts))
    full = dict(sd)
    for k in own:
        if k.endswith("num_batches_tracked") and k not in full:
            full[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict({k: full[k] for k in own}, strict=True)


def suspect_weights(sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """``(non-finite, integer)``: names of tensors holding NaN/inf, and of weights stored with an
    integer dtype (BatchNorm's step counter excepted). Both load without error (integers are cast),
    and both make a model whose outputs are wrong, so loading warns and ``clipforge info`` shows them."""
    nonfinite, integer = [], []
    for k, v in sd.items():
        if v.is_floating_point() or v.is_complex():
            if not bool(torch.isfinite(v).all()):
                nonfinite.append(k)
        elif not k.endswith("num_batches_tracked"):
            integer.append(k)
    return nonfinite, integer


def describe_suspect(nonfinite: list[str] | tuple[str, ...], integer: list[str] | tuple[str, ...],
                     first: int = 3) -> str:
    """One line for :func:`suspect_weights`'s findings ('' when there are none)."""
    def names(keys: list[str] | tuple[str, ...]) -> str:
        return ", ".join(keys[:first]) + (", ..." if len(keys) > first else "")

    parts = []
    if nonfinite:
        n = len(nonfinite)
        parts.append(f"{n} tensor{'s hold' if n > 1 else ' holds'} NaN or inf values ({names(nonfinite)})")
    if integer:
        n = len(integer)
        parts.append(f"{n} weight tensor{'s have' if n > 1 else ' has'} an integer dtype ({names(integer)}; "
                     f"cast to float when loaded)")
    return "; ".join(parts)
