"""Real models for demos, tests and benchmarks, built offline.

torchvision models get random weights (no download) and realistic activations: batch-norm statistics are
re-estimated by a few train-mode forwards on random batches, then the model is put in eval mode.

Example:
    >>> from fxquant.zoo import torchvision_model
    >>> m = torchvision_model("resnet18", image_size=32, bn_batches=1)   # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["torchvision_model", "reestimate_bn"]


def reestimate_bn(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Update every batch norm's running statistics by train-mode forwards on ``batches`` (the layers' own
    momentum, as a short training run would); returns ``model`` in eval mode. A model with no norm layer that
    tracks running statistics is not run at all."""
    if not any(getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None
               for m in model.modules()):
        return model.eval()  # no running statistics (a ViT, a Swin): the forwards would change nothing
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    return model.eval()


def _reinit_zero_linears(model: nn.Module) -> None:
    """torchvision zero-initialises some classifier heads (vit_b_16): their output would be all zeros, which
    makes any accuracy measurement meaningless. They get PyTorch's default Linear initialisation instead."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and not bool(m.weight.detach().any()):
            m.reset_parameters()


def torchvision_model(name: str, *, image_size: int = 224, seed: int = 0, bn_batches: int = 8,
                      batch_size: int = 8) -> nn.Module:
    """A torchvision classification model with random weights and re-estimated BN statistics, in eval mode.

    Args:
        name: a ``torchvision.models`` builder name (``"resnet18"``).
        image_size: height and width of the random batches.
        seed: seeds the weights and the batches.
        bn_batches: train-mode forwards used to estimate BN statistics.
        batch_size: images per batch.

    Returns:
        The model in eval mode.
    """
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - torchvision is in the test extra
        raise ImportError("the model zoo needs torchvision: pip install -e '.[test]'") from exc
    torch.manual_seed(seed)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    _reinit_zero_linears(model)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randn(batch_size, 3, image_size, image_size, generator=gen) for _ in range(bn_batches)]
    return reestimate_bn(model, batches)
