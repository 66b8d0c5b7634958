"""Small shared pieces for the training tests (random but realistic batches)."""

from __future__ import annotations

import torch

WORDS = "red green blue yellow circle square triangle star small big left right top bottom one two three".split()


def random_batch(n: int, image_size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images and tokenized random captions of varying length."""
    from clipforge.tokenizer import tokenize

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    caps = []
    for _ in range(n):
        k = int(torch.randint(2, 7, (1,), generator=g))
        caps.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
    return images, tokenize(caps)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

