"""Build torchvision / timm models by name, adapted to a dataset's channels and image size.

Adaptation changes only the input layer (channels) and, for ViTs, the image and patch size;
the rest of the architecture is the library's own.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ..errors import ConfigError


def _adapt_first_conv(model: nn.Module, channels: int) -> None:
    """Give the first Conv2d `channels` input channels (same kernel, stride, padding)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != channels:
                    setattr(parent, name, nn.Conv2d(
                        channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                        child.dilation, child.groups if child.groups == 1 else channels,
                        bias=child.bias is not None, padding_mode=child.padding_mode))
                return


def small_cnn(*, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """Two conv blocks and two linear layers: the leakage suite's CNN (about 0.2 M parameters)."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes))


def small_vit(*, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """A two-block, 64-wide ViT with 4x4 patches of side image_size/4: the leakage suite's ViT."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=image_size, patch_size=image_size // 4, in_chans=channels,
                             num_classes=num_classes, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)


SMALL_MODELS = {"small_cnn": small_cnn, "small_vit": small_vit}


def _vit_patch(image_size: int) -> int:
    return 4 if image_size <= 64 else 16


def build_model(name: str, *, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """`name` is ``small_cnn``/``small_vit``, a torchvision model (``resnet18``) or ``timm:<name>`` / a timm name."""
    import torchvision

    tv_names = set(torchvision.models.list_models(module=torchvision.models))
    timm_name = name.removeprefix("timm:")
    try:
        model = _construct(name, timm_name, tv_names, num_classes=num_classes, channels=channels,
                           image_size=image_size)
    except (AssertionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot build model {name!r} for {channels}x{image_size}x{image_size} inputs: "
                          f"{e or type(e).__name__}") from None
    _adapt_first_conv(model, channels)
    with torch.no_grad():  # fail now, with a clear message, if the adaptation did not fit
        try:
            model.eval()(torch.zeros(2, channels, image_size, image_size))
        except (AssertionError, RuntimeError) as e:
            raise ConfigError(f"model {name!r} does not accept {channels}x{image_size}x{image_size} "
                              f"inputs: {e}") from None
    return model.train()


def _construct(name: str, timm_name: str, tv_names: set[str], *, num_classes: int, channels: int,
               image_size: int) -> nn.Module:
    import timm
    import torchvision

    if name in SMALL_MODELS:
        model = SMALL_MODELS[name](num_classes=num_classes, channels=channels, image_size=image_size)
    elif not name.startswith("timm:") and name in tv_names:
        kwargs: dict = {"num_classes": num_classes}
        if name.startswith("vit_"):  # torchvision fixes the patch size by name
            kwargs["image_size"] = image_size
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    elif timm.is_model(timm_name):
        kwargs = {"num_classes": num_classes, "in_chans": channels, "pretrained": False}
        if "vit" in timm_name or "deit" in timm_name:
            kwargs.update(img_size=image_size, patch_size=_vit_patch(image_size))
        model = timm.create_model(timm_name, **kwargs)
    else:
        candidates = sorted(tv_names | set(timm.list_models()) | set(SMALL_MODELS))
        close = difflib.get_close_matches(timm_name, candidates, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}: not a torchvision or timm model name.{hint}")
    return model
