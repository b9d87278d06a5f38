"""The networks digitlab trains, each described by a small config dataclass that every checkpoint stores.

Read top to bottom: the tutorial's MLP first, then a small CNN for accuracy, then the registry that lets
the rest of digitlab build either by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
from torch import nn

from .errors import DigitlabError

# ----------------------------------------------------------------------------------------------------------
# The tutorial's network: Flatten -> Linear(784, 512) -> ReLU -> Linear(512, 512) -> ReLU -> Linear(512, 10)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MLPConfig:
    in_features: int = 28 * 28
    hidden: int = 512
    num_classes: int = 10


class MLP(nn.Module):
    """The tutorial's fully connected network; returns logits (softmax them for probabilities)."""

    def __init__(self, config: MLPConfig | None = None):
        super().__init__()
        self.config = config or MLPConfig()
        c = self.config
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(c.in_features, c.hidden),
            nn.ReLU(),
            nn.Linear(c.hidden, c.hidden),
            nn.ReLU(),
            nn.Linear(c.hidden, c.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)  # (B, 1, 28, 28) -> (B, 784)
        return self.linear_relu_stack(x)  # (B, 10) logits

    def hidden_activations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What each layer computes, for "look inside" views: both hidden layers (after ReLU) and the logits."""
        x = self.flatten(x)
        stack = self.linear_relu_stack
        hidden1 = stack[1](stack[0](x))  # (B, 512)
        hidden2 = stack[3](stack[2](hidden1))  # (B, 512)
        return {"hidden1": hidden1, "hidden2": hidden2, "logits": stack[4](hidden2)}


# ----------------------------------------------------------------------------------------------------------
# A small CNN: three conv blocks with batch norm, global max pooling, one linear layer.
# Sized for a 2-core CPU: 24 k parameters, about 4 MFLOPs per image.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CNNConfig:
    channels: tuple[int, int, int] = (16, 32, 64)
    num_classes: int = 10
    convs_per_stage: int = 1  # 2 doubles the depth at each resolution (the `best` recipe's wider, deeper CNN)


def conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    """3x3 conv -> [2x2 max pool] -> batch norm -> ReLU.

    Pooling straight after the conv (before batch norm and ReLU) gives the same kind of features but runs
    batch norm and ReLU on a quarter of the pixels: a third less time per step on a CPU.
    The conv has no bias because batch norm adds one.
    """
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def stage(c_in: int, c_out: int, pool: bool, convs: int) -> nn.Sequential:
    """`convs` conv blocks at one resolution; the last one pools. One block is just `conv_block`."""
    if convs == 1:
        return conv_block(c_in, c_out, pool)
    blocks = [conv_block(c_in if i == 0 else c_out, c_out, pool and i == convs - 1) for i in range(convs)]
    return nn.Sequential(*blocks)


class CNN(nn.Module):
    def __init__(self, config: CNNConfig | None = None):
        super().__init__()
        self.config = config or CNNConfig()
        c1, c2, c3 = self.config.channels
        n = self.config.convs_per_stage
        self.features = nn.Sequential(
            stage(1, c1, pool=True, convs=n),  # (B, c1, 14, 14)
            stage(c1, c2, pool=True, convs=n),  # (B, c2, 7, 7)
            stage(c2, c3, pool=False, convs=n),  # (B, c3, 7, 7)
        )
        self.pool = nn.AdaptiveMaxPool2d(1)  # (B, c3, 1, 1): the strongest response of each feature anywhere
        self.flatten = nn.Flatten()  # (B, c3)
        self.classifier = nn.Linear(c3, self.config.num_classes)  # (B, 10) logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))

    def hidden_activations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps after each conv block, and the logits."""
        maps: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.features):
            x = block(x)
            maps[f"conv{i + 1}"] = x  # (B, C, H, W)
        maps["logits"] = self.classifier(self.flatten(self.pool(x)))
        return maps


# ----------------------------------------------------------------------------------------------------------
# Registry: name -> (config class, model class)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    config_cls: type
    model_cls: Callable[[Any], nn.Module]
    description: str


MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry(MLPConfig, MLP, "the tutorial's network: 784-512-512-10, ReLU"),
    "cnn": ModelEntry(CNNConfig, CNN, "3 conv blocks with batch norm, global max pooling (24 k parameters)"),
}


class ModelError(DigitlabError, ValueError):
    """An unknown model name or config field."""


def build_model(name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Build a registered model; `config` overrides fields of its config dataclass."""
    try:
        entry = MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(MODELS)})") from None
    config = dict(config or {})
    known = {f.name for f in fields(entry.config_cls)}
    unknown = set(config) - known
    if unknown:
        raise ModelError(f"model {name!r} has no config field(s) {', '.join(sorted(unknown))}")
    defaults = entry.config_cls()
    # JSON turns tuples into lists; give fields back the type of their defaults.
    cfg = entry.config_cls(**{k: type(getattr(defaults, k))(v) for k, v in config.items()})
    return entry.model_cls(cfg)


def model_config(model: nn.Module) -> dict[str, Any]:
    """The config dataclass of a built model, as a JSON-ready dict."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.config).items()}


def model_name(model: nn.Module) -> str:
    for name, entry in MODELS.items():
        if type(model) is entry.model_cls:
            return name
    raise ModelError(f"{type(model).__name__} is not a registered digitlab model")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
