"""The paper's networks: sizes, layouts and the behaviours the research code relies on."""

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from cl_lightning.methods.line_gradient import LineGradient
from cl_lightning.models.nets import MLP, ResNet18
from cl_lightning.models.population import Population, fresh_copy, init_member


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


def _with_and_without_neighbours(net: nn.Module, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of three images alone, beside three others, and the six in the other mode."""
    x = torch.rand(6, 3, 32, 32)
    net.train(training)
    with torch.no_grad():
        whole = net(x)
        first_half = net(x[:3])
        in_other_mode = net.train(not training)(x)
    return whole[:3], first_half, in_other_mode


@pytest.mark.parametrize("training", [True, False])
def test_resnet18_uses_batch_statistics_in_both_modes(training: bool) -> None:
    torch.manual_seed(0)
    with_others, alone, in_other_mode = _with_and_without_neighbours(ResNet18(num_classes=10, width=4), training)
    # A sample's logits depend on which samples share its batch...
    assert not torch.allclose(with_others, alone, atol=1e-4)
    # ...and train/eval mode makes no difference.
    torch.testing.assert_close(with_others, in_other_mode[:3])


def test_resnet18_with_running_statistics_evaluates_each_image_on_its_own() -> None:
    torch.manual_seed(0)
    net = ResNet18(num_classes=10, width=4, bn_stats="running")
    with torch.no_grad():  # some training-mode forwards give the running averages content
        for _ in range(3):
            net.train()(torch.rand(8, 3, 32, 32) * 2)
    assert len(list(net.buffers())) == 3 * 20  # mean, var and count of each of its 20 BatchNorms
    assert net.bn1.num_batches_tracked.item() == 3
    torch.manual_seed(1)
    with_others, alone, _ = _with_and_without_neighbours(net, training=False)
    torch.testing.assert_close(with_others, alone)  # evaluation: independent of the other batch members
    torch.manual_seed(1)
    with_others, alone, in_eval = _with_and_without_neighbours(net, training=True)
    assert not torch.allclose(with_others, alone, atol=1e-4)  # training: batch statistics
    assert not torch.allclose(with_others, in_eval[:3], atol=1e-4)
    # no parameter added: flat parameter vectors keep their layout
    assert [p.shape for p in net.parameters()] == [p.shape for p in ResNet18(num_classes=10, width=4).parameters()]


def test_resnet18_dropout_follows_each_block_batchnorm_in_training_only() -> None:
    torch.manual_seed(0)
    net = ResNet18(num_classes=10, width=4, dropout=0.5)
    plain = ResNet18(num_classes=10, width=4, dropout=0.0)
    plain.load_state_dict(net.state_dict())
    # where: one Dropout(p) right after each BatchNorm of each basic block (Stable SGD's IC1/IC2),
    # none after the stem's or a shortcut's BatchNorm
    fed_from: dict[str, str] = {}
    last_bn: list[str] = []
    names = {m: n for n, m in net.named_modules()}
    hooks = [m.register_forward_hook(lambda m, i, o: last_bn.append((names[m], o)))
             for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks += [m.register_forward_hook(lambda m, i, o: fed_from.__setitem__(
        names[m], next(n for n, out in reversed(last_bn) if out is i[0])))
        for m in net.modules() if isinstance(m, nn.Dropout)]
    x = torch.rand(6, 3, 32, 32)
    net.train()
    first, second = net(x), net(x)
    for h in hooks:
        h.remove()
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert fed_from == {f"{block}.drop{i}": f"{block}.bn{i}" for block in blocks for i in (1, 2)}
    assert all(m.p == 0.5 for m in net.modules() if isinstance(m, nn.Dropout))
    # when: random in training mode, off in evaluation mode
    assert not torch.allclose(first, second)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))
        torch.testing.assert_close(net(x), plain.eval()(x))


@pytest.mark.parametrize(("dropout", "bn_stats"), [(0.0, "batch"), (0.3, "running")])
def test_resnet18_options_work_in_mcsgd_line_gradient(dropout: float, bn_stats: str) -> None:
    """MC-SGD's consolidation runs the net in eval mode (dropout off, as the research code; and in train mode,
    vmap over BatchNorm with running statistics fails on its in-place buffer update, see PyTorch's "Patching Batch
    Norm" page of torch.func): vmap and the loop agree with either BatchNorm option and dropout, and the running
    statistics are only read."""
    torch.manual_seed(0)
    population = Population.from_seeds(lambda: ResNet18(num_classes=10, width=4, dropout=dropout, bn_stats=bn_stats),
                                       [0, 1]).double()
    with torch.no_grad():  # running averages away from (0, 1)
        population.train()(torch.rand(2, 8, 3, 32, 32, dtype=torch.float64), step=0)
    population.eval()
    buffers = [b.clone() for b in population.buffers()]
    start = population.flat()
    end = start + 0.05 * torch.randn_like(start)
    x, y = torch.rand(2, 6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (2, 6))
    loop, _ = LineGradient(population, 5, "reference", "loop")(start, end, x, y)
    vmapped, _ = LineGradient(population, 5, "reference", "vmap")(start, end, x, y)
    torch.testing.assert_close(vmapped, loop)
    assert all(torch.equal(a, b) for a, b in zip(buffers, population.buffers()))


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


@pytest.mark.parametrize(
    "kwargs", [{"num_classes": 0}, {"width": 0}, {"in_channels": -3}, {"dropout": 1.0}, {"bn_stats": "ema"}]
)
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


def test_mlp_truncated_normal_init_is_the_tf_codes_and_reaches_every_member() -> None:
    net = MLP(784, [256, 256], 10, init="truncated_normal")
    weights = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, nn.Linear)])
    biases = torch.cat([m.bias for m in net.modules() if isinstance(m, nn.Linear)])
    assert weights.abs().max() <= 0.2 and abs(weights.std().item() - 0.088) < 0.002  # N(0, 0.1) cut at 2 std
    assert torch.equal(biases, torch.full_like(biases, 0.1))
    # members are drawn by re-initialising a copy: they get the same initialisation, from their seed
    member = init_member(lambda: fresh_copy(net), seed=3)
    again = init_member(lambda: MLP(784, [256, 256], 10, init="truncated_normal"), seed=3)
    for a, b in zip(member.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(member.layers[0].bias, torch.full((256,), 0.1))
    default = MLP(784, [256, 256], 10)
    assert default.layers[0].weight.abs().max() <= 1 / 28  # PyTorch's U(-1/sqrt(784), 1/sqrt(784))
