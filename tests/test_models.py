"""The tutorial's MLP exactly, the CNN's shapes, and the model registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from digitlab.errors import DigitlabError
from digitlab.models import (
    CNN,
    MLP,
    MODELS,
    CNNConfig,
    MLPConfig,
    ModelError,
    build_model,
    count_parameters,
    model_config,
    model_name,
)


def test_mlp_is_exactly_the_tutorial_network():
    model = build_model("mlp")
    layers = [m for m in model.modules() if not isinstance(m, (MLP, nn.Sequential))]
    assert [type(m) for m in layers] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 512), (512, 512), (512, 10)]
    assert all(m.bias is not None for m in linears)
    assert [tuple(p.shape) for p in model.parameters()] == [(512, 784), (512,), (512, 512), (512,), (10, 512), (10,)]
    assert count_parameters(model) == 669_706 == (784 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)


def test_mlp_returns_logits_for_a_batch():
    torch.manual_seed(0)
    model = build_model("mlp")
    x = torch.rand(5, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (5, 10)
    # Logits, not probabilities: no softmax inside, so rows do not sum to 1.
    assert not torch.allclose(logits.sum(1), torch.ones(5))
    manual = x.flatten(1)
    stack = model.linear_relu_stack
    manual = stack[4](torch.relu(stack[2](torch.relu(stack[0](manual)))))
    torch.testing.assert_close(logits, manual)


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_output_shapes(batch):
    x = torch.randn(batch, 1, 28, 28)
    for name in ("mlp", "cnn"):
        model = build_model(name).eval()
        with torch.no_grad():
            assert model(x).shape == (batch, 10), name


def test_cnn_structure():
    model = build_model("cnn")
    assert isinstance(model, CNN) and model.config == CNNConfig()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 16), (16, 32), (32, 64)]
    assert model.classifier.in_features == 64 and model.classifier.out_features == 10


def test_hidden_activations_mlp():
    torch.manual_seed(1)
    model = build_model("mlp")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        acts = model.hidden_activations(x)
        logits = model(x)
    assert list(acts) == ["hidden1", "hidden2", "logits"]
    assert acts["hidden1"].shape == (4, 512) and acts["hidden2"].shape == (4, 512)
    assert float(acts["hidden1"].min()) >= 0 and float(acts["hidden2"].min()) >= 0  # after ReLU
    torch.testing.assert_close(acts["logits"], logits)


def test_hidden_activations_cnn():
    model = build_model("cnn").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        acts = model.hidden_activations(x)
        logits = model(x)
    assert {k: tuple(v.shape) for k, v in acts.items()} == {
        "conv1": (2, 16, 14, 14),
        "conv2": (2, 32, 7, 7),
        "conv3": (2, 64, 7, 7),
        "logits": (2, 10),
    }
    torch.testing.assert_close(acts["logits"], logits)


def test_registry_unknown_name():
    with pytest.raises(ModelError, match="unknown model 'resnet' \\(known: mlp, cnn\\)") as exc:
        build_model("resnet")
    assert isinstance(exc.value, DigitlabError)
    assert set(MODELS) >= {"mlp", "cnn"}


def test_config_override_and_round_trip():
    model = build_model("mlp", {"hidden": 64})
    assert model.config == MLPConfig(hidden=64)
    assert count_parameters(model) == (784 * 64 + 64) + (64 * 64 + 64) + (64 * 10 + 10)
    cnn = build_model("cnn", {"channels": [4, 8, 12]})  # as it comes back from JSON
    assert cnn.config.channels == (4, 8, 12)
    assert model_config(cnn) == {"channels": [4, 8, 12], "num_classes": 10, "convs_per_stage": 1}
    rebuilt = build_model("cnn", model_config(cnn))
    assert rebuilt.config == cnn.config
    assert cnn(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_two_convs_per_stage_make_a_deeper_cnn_with_the_same_shapes():
    """The `best` recipe's CNN: two 3x3 convs at each resolution, the second of each pair pooling."""
    deep = build_model("cnn", {"channels": [8, 16, 32], "convs_per_stage": 2})
    convs = [m for m in deep.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32]
    maps = deep.hidden_activations(torch.randn(2, 1, 28, 28))
    assert [tuple(maps[k].shape[1:]) for k in ("conv1", "conv2", "conv3")] == [(8, 14, 14), (16, 7, 7), (32, 7, 7)]
    assert deep(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_config_field():
    with pytest.raises(ModelError, match="model 'mlp' has no config field\\(s\\) depth, width"):
        build_model("mlp", {"width": 3, "depth": 2, "hidden": 8})


def test_model_name():
    assert model_name(build_model("mlp")) == "mlp"
    assert model_name(build_model("cnn")) == "cnn"
    with pytest.raises(ModelError, match="Linear is not a registered digitlab model"):
        model_name(nn.Linear(2, 2))
