"""The paper's networks: sizes, layouts and the behaviours the research code relies on."""

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from cl_lightning.models.nets import MLP, ResNet18


def num_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_mlp_has_the_papers_parameter_count_and_layout() -> None:
    net = MLP()  # 784-256-256-10
    assert num_params(net) == 269_322
    # Flat-vector layout of the research code: W1, b1, W2, b2, W3, b3.
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(256, 784), (256,), (256, 256), (256,), (10, 256), (10,)]


def test_resnet18_has_the_papers_parameter_count_and_no_buffers() -> None:
    net = ResNet18()  # width 20: 20-40-80-160, 100 classes
    assert num_params(net) == 1_108_680
    assert list(net.buffers()) == []  # no running statistics anywhere
    assert net.linear.in_features == 160


@pytest.mark.parametrize("shape", [(5, 784), (5, 1, 28, 28)])
def test_mlp_flattens_its_input(shape: tuple[int, ...]) -> None:
    assert MLP(hidden_sizes=[32], dropout=0.2)(torch.rand(shape)).shape == (5, 10)


def test_mlp_without_hidden_layers_is_linear() -> None:
    net = MLP(input_size=12, hidden_sizes=[], num_classes=3)
    assert [type(m) for m in net.modules()][1:] == [nn.Sequential, nn.Linear]
    assert net(torch.rand(4, 12)).shape == (4, 3)


@pytest.mark.parametrize(("in_channels", "num_classes"), [(3, 100), (1, 7)])
def test_resnet18_output_shape(in_channels: int, num_classes: int) -> None:
    net = ResNet18(num_classes=num_classes, width=4, in_channels=in_channels)
    assert net(torch.rand(3, in_channels, 32, 32)).shape == (3, num_classes)


def test_mlp_dropout_is_active_in_training_only() -> None:
    torch.manual_seed(0)
    net = MLP(input_size=20, hidden_sizes=[64, 64], dropout=0.5)
    plain = MLP(input_size=20, hidden_sizes=[64, 64], dropout=0.0)
    plain.load_state_dict(net.state_dict())
    x = torch.rand(8, 20)

    net.train()
    assert not torch.equal(net(x), net(x))

    net.eval()
    assert torch.equal(net(x), net(x))
    torch.testing.assert_close(net(x), plain(x))


@pytest.mark.parametrize("training", [True, False])
def test_resnet18_uses_batch_statistics_in_both_modes(training: bool) -> None:
    torch.manual_seed(0)
    net = ResNet18(num_classes=10, width=4).train(training)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        whole = net(x)
        first_half = net(x[:3])
        other_batch = net(torch.cat([x[:3], torch.rand(3, 3, 32, 32)]))
        in_other_mode = net.train(not training)(x)
    # A sample's logits depend on which samples share its batch...
    assert not torch.allclose(whole[:3], first_half, atol=1e-4)
    assert not torch.allclose(whole[:3], other_batch[:3], atol=1e-4)
    # ...and train/eval mode makes no difference.
    torch.testing.assert_close(whole, in_other_mode)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_size": 0},
        {"num_classes": -1},
        {"hidden_sizes": [256, 0]},
        {"hidden_sizes": [2.5]},
        {"dropout": 1.0},
        {"dropout": -0.1},
    ],
)
def test_mlp_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_")[0]):
        MLP(**kwargs)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"width": 0}, {"in_channels": -3}])
def test_resnet18_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ResNet18(**kwargs)


def test_networks_build_from_a_class_path_config() -> None:
    """LightningCLI configs name the nets by class_path with plain init_args."""
    parser = ArgumentParser()
    parser.add_argument("--net", type=nn.Module)
    config = parser.parse_object(
        {
            "net": {
                "class_path": "cl_lightning.models.nets.MLP",
                "init_args": {"hidden_sizes": [100, 50], "dropout": 0.25},
            }
        }
    )
    net = parser.instantiate(config).net
    assert isinstance(net, MLP)
    assert [tuple(p.shape) for p in net.parameters()][::2] == [(100, 784), (50, 100), (10, 50)]
    assert net.layers[2].p == 0.25
