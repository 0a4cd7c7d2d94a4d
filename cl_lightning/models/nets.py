"""The networks of the MC-SGD paper (Mirzadeh et al., ICLR 2021), faithful to its research code.

Both are plain :class:`torch.nn.Module` s that return logits. Task masking (split CIFAR-100)
is not done here: the LightningModule or the method applies it to the logits, so one network
class serves single-head and task-masked benchmarks alike.

Constructor arguments are plain types because LightningCLI/jsonargparse builds the networks from
YAML (``class_path: cl_lightning.models.nets.MLP``); the argument docs below become ``--help``.

Parameter layout matters: MC-SGD moves along lines between flat parameter vectors
(``torch.nn.utils.parameters_to_vector(net.parameters())``), so the order of the parameters is
part of each network's contract and matches the research code's
(``imirzadeh/CL-LinearModeConnectivity``, ``core/models.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.errors import ConfigError

__all__ = ["MLP", "ResNet18", "BNStats", "Init", "is_plain_mlp"]

#: How an :class:`MLP`'s layers start: PyTorch's default (``nn.Linear.reset_parameters``), or the
#: A-GEM TensorFlow code's (:class:`TruncatedNormalLinear`), where the EWC, A-GEM and ER baselines come from.
Init = Literal["pytorch", "truncated_normal"]


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _require_probability(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")


class TruncatedNormalLinear(nn.Linear):
    """``nn.Linear`` initialised as the A-GEM TensorFlow code's fully connected layers
    (facebookresearch/agem 4542149, ``model/model.py`` lines 24-53, ``weight_variable`` and
    ``bias_variable``; the same in the MC-SGD authors' fork of it): weights from
    ``tf.truncated_normal_initializer(stddev=0.1)``, a normal of std 0.1 redrawn beyond two std, and
    biases 0.1. The initialisation lives in ``reset_parameters`` so that a population's members, drawn
    by re-initialising a copy of the network (``models/population.py``), get it too."""

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.1, a=-0.2, b=0.2)
        nn.init.constant_(self.bias, 0.1)


class MLP(nn.Module):
    """Fully connected ReLU network of the MNIST benchmarks (784-256-256-10 in the paper).

    Each hidden layer is ``Linear -> ReLU -> Dropout(p)``, then a final ``Linear`` gives the
    logits: the research code's order, so a flat parameter vector has the same layout
    (W1, b1, W2, b2, W3, b3). Dropout matters only in training mode; MC-SGD's line search
    runs the network in eval mode, where dropout is off.

    Args:
        input_size: Number of input features. Inputs of shape ``(N, C, H, W)`` are flattened,
            so 784 fits 1x28x28 MNIST images.
        hidden_sizes: Width of each hidden layer, e.g. ``[256, 256]``. An empty list gives a
            linear (softmax-regression) model.
        num_classes: Number of output logits.
        dropout: Dropout probability after each hidden ReLU, in ``[0, 1)``. The paper uses
            0.2 on rotated MNIST and 0.25 on permuted MNIST.
        init: The layers' initial weights: ``pytorch`` (PyTorch's default, as the MC-SGD research
            code) or ``truncated_normal`` (std 0.1, biases 0.1: the A-GEM TensorFlow code that the
            EWC, A-GEM and ER baselines come from).
    """

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: Sequence[int] = (256, 256),
        num_classes: int = 10,
        dropout: float = 0.0,
        init: Init = "pytorch",
    ) -> None:
        super().__init__()
        if init not in get_args(Init):
            raise ConfigError(f"init must be one of {get_args(Init)}, got {init!r}")
        linear = TruncatedNormalLinear if init == "truncated_normal" else nn.Linear
        _require_positive(input_size=input_size, num_classes=num_classes)
        hidden_sizes = list(hidden_sizes)
        for i, size in enumerate(hidden_sizes):
            _require_positive(**{f"hidden_sizes[{i}]": size})
        _require_probability(dropout)

        layers: list[nn.Module] = []
        width = input_size
        for size in hidden_sizes:
            layers += [linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, input_size)`` or ``(N, C, H, W)``."""
        return self.layers(x.flatten(1))


def is_plain_mlp(net: nn.Module) -> bool:
    """Whether ``net`` is an :class:`MLP` running ``MLP.forward`` (a subclass with another forward is
    not): the layer-by-layer batched paths of a population and of MC-SGD's line gradient assume it."""
    return isinstance(net, MLP) and type(net).forward is MLP.forward


#: Where a ResNet18 BatchNorm takes its normalisation statistics from in evaluation mode.
BNStats = Literal["batch", "running"]


def _batch_norm(channels: int, bn_stats: BNStats, affine: bool = True) -> nn.BatchNorm2d:
    """A BatchNorm of the reduced ResNet18.

    ``"batch"``: no running buffers (``track_running_stats=False``), so every forward, in training
    and in evaluation, normalises with the statistics of its own batch: the MC-SGD research code.
    ``"running"``: PyTorch's default, batch statistics in training and running averages of them
    in evaluation: the A-GEM code's ``_bn`` (facebookresearch/agem 4542149, ``utils/resnet_utils.py``
    lines 57-83: ``tf.cond(train_phase, batch moments + EMA update, EMA averages)``; its test passes
    ``train_phase: False``, ``conv_split_cifar.py`` lines 614/623). Its EMA decay 0.9 is PyTorch's
    ``momentum=0.1``. Left as they are: its eps 1e-3 (here 1e-5), its zero-debiased EMA of the
    biased batch variance (here running averages start at mean 0, variance 1 and take the unbiased
    variance); after the first few dozen steps of a task they agree.
    """
    return nn.BatchNorm2d(channels, affine=affine, track_running_stats=bn_stats == "running")


class _BasicBlock(nn.Module):
    """ResNet basic block with the research code's BatchNorm settings.

    The projection shortcut's BatchNorm has no affine parameters, as in the MC-SGD research code.
    With ``dropout > 0`` a dropout follows each of the block's two BatchNorms (Stable SGD's
    ``IC1``/``IC2 = BatchNorm2d -> Dropout``; see :class:`ResNet18`). The ReLU after ``bn1``
    comes after the dropout too; the two commute (a dropout mask scales by 0 or 1/(1-p) >= 0).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float, bn_stats: BNStats) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _batch_norm(planes, bn_stats)
        self.drop1 = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _batch_norm(planes, bn_stats)
        self.drop2 = nn.Dropout(dropout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                _batch_norm(planes, bn_stats, affine=False),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.drop1(self.bn1(self.conv1(x))))
        out = self.drop2(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """Reduced ResNet18 of GEM / A-GEM and MC-SGD's split CIFAR-100 experiments.

    BasicBlocks ``[2, 2, 2, 2]`` with widths ``width * (1, 2, 4, 8)`` (20-40-80-160 for the
    paper's ``width=20``, "3x fewer feature maps" than the standard ResNet18), bias-free 3x3
    convolutions, a stride-1 3x3 stem, ``avg_pool2d(out, 4)`` and a linear classifier; with the
    defaults it has 1,108,680 parameters (neither option below adds any, so flat parameter
    vectors keep their layout).

    BatchNorm statistics (``bn_stats``): by default, batch statistics in training *and*
    evaluation (no running buffers), exactly like the MC-SGD research code: predictions then
    depend on the rest of the batch, and test accuracy on the evaluation batch size. The A-GEM
    code the paper's EWC/A-GEM/ER baselines came from, and Stable SGD's ResNet (PyTorch's
    default ``BatchNorm2d``), evaluate with running statistics instead: ``bn_stats="running"``.
    Either way a training-mode forward normalises with its batch's statistics; with
    ``"running"`` it also updates the running averages. MC-SGD's consolidation and EWC's Fisher
    run the network in evaluation mode, where both options work under ``torch.func.vmap``
    (running statistics are read, not updated). Flat parameter vectors (MC-SGD's solutions,
    ``cl-lightning path``) carry no running statistics: with ``"running"`` a vector loaded into
    the net is evaluated with whatever statistics the net holds, which is why the MC-SGD
    configs keep ``"batch"``, the research code's choice.

    Dropout (``dropout``): Stable SGD's ResNet18 puts ``Dropout(p)`` right after each BatchNorm
    of its basic blocks, none after the stem's BatchNorm (imirzadeh/stable-continual-learning
    be4049c, ``stable_sgd/models.py`` lines 50-58 and 76-77); here likewise after ``bn1`` and
    ``bn2`` of every block and nowhere else (its blocks have no shortcut BatchNorm). Its block is
    otherwise a different net (it never applies ``conv2``: ``conv1 -> relu -> BN -> dropout ->
    + shortcut -> relu -> BN -> dropout``, lines 60-68), which is not reproduced: every CIFAR
    config uses this network. The MC-SGD research config's dropout was not used by its ResNet,
    so the default is 0.

    Args:
        num_classes: Number of output logits (100 for split CIFAR-100, masked per task outside
            the network).
        width: Channels of the first stage; later stages have 2x, 4x and 8x as many.
        in_channels: Channels of the input images (3 for CIFAR). Inputs must be 32x32 (more
            precisely, the last stage's 4x4 map is what ``avg_pool2d(out, 4)`` reduces to 1x1).
        dropout: Dropout probability after each basic-block BatchNorm, in ``[0, 1)``, active in
            training mode only (Stable SGD on CIFAR: 0.1).
        bn_stats: ``"batch"`` (MC-SGD research code) or ``"running"`` (A-GEM code, Stable SGD):
            the statistics BatchNorm normalises with in evaluation mode.
    """

    def __init__(
        self,
        num_classes: int = 100,
        width: int = 20,
        in_channels: int = 3,
        dropout: float = 0.0,
        bn_stats: BNStats = "batch",
    ) -> None:
        super().__init__()
        _require_positive(num_classes=num_classes, width=width, in_channels=in_channels)
        _require_probability(dropout)
        if bn_stats not in get_args(BNStats):
            raise ConfigError(f"bn_stats must be one of {get_args(BNStats)}, got {bn_stats!r}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = _batch_norm(width, bn_stats)
        stages = []
        in_planes = width
        for multiplier, stride in zip((1, 2, 4, 8), (1, 2, 2, 2)):
            planes = width * multiplier
            stages.append(
                nn.Sequential(
                    _BasicBlock(in_planes, planes, stride, dropout, bn_stats),
                    _BasicBlock(planes, planes, 1, dropout, bn_stats),
                )
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)`` for images of shape ``(N, in_channels, 32, 32)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(torch.flatten(out, 1))
