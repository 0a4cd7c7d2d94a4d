"""MC-SGD's line gradient: backends agree, and the reference weighting is the research code's."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from cl_lightning.methods.line_gradient import LineGradient
from cl_lightning.models.nets import MLP, ResNet18

K = 5


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def make_case(net: nn.Module, x: Tensor, num_classes: int, seed: int = 0):
    """An eval-mode net with a segment (start, end) around its weights and a labelled batch."""
    torch.manual_seed(seed)
    net.eval()
    start = parameters_to_vector(net.parameters())  # requires grad: must be handled
    end = start.detach() + 0.05 * torch.randn_like(start)
    y = torch.randint(0, num_classes, (x.shape[0],))
    return net, start, end, x, y


@pytest.fixture
def mlp_case():
    torch.manual_seed(0)
    net = MLP(input_size=64, hidden_sizes=[32, 32], dropout=0.2)
    return make_case(net, torch.rand(16, 1, 8, 8), 10)


@pytest.fixture(scope="module")
def resnet_case():
    """Float64: with batch-statistics BatchNorm, float32 gradients of this net carry ~0.3 %
    rounding error (loop and vmap alike, measured against float64), too much to compare.
    Width 8 keeps the float64 convolutions cheap; the architecture is the paper's."""
    torch.manual_seed(0)
    net = ResNet18(num_classes=20, width=8).double()
    return make_case(net, torch.rand(8, 3, 32, 32, dtype=torch.float64), 20)


def point_nets(net: nn.Module, start: Tensor, end: Tensor) -> list[nn.Module]:
    """Independent copies of ``net`` holding theta_j = start + j/K (end - start)."""
    copies = []
    for alpha in torch.linspace(0, 1, K + 1, dtype=start.dtype):
        point = copy.deepcopy(net)
        vector_to_parameters(torch.lerp(start.detach(), end, alpha), point.parameters())
        copies.append(point)
    return copies


def research_line_gradient(net, start, end, x, y, logit_mask=None) -> Tensor:
    """Literal emulation of the research code's ``get_line_loss`` (CL-LinearModeConnectivity,
    core/mode_connectivity.py): one model whose weights are overwritten with load_state_dict at
    each point, ``.grad`` never zeroed, (batch-mean CE / batch size).backward(), and the running
    ``.grad`` sums summed; task masking by writing -10e10 into ``logits.data``."""
    model = copy.deepcopy(net).eval()
    names = [name for name, _ in model.named_parameters()]
    accum = None
    for t in np.arange(0.0, 1.01, 1.0 / K):
        current = start.detach() + (end - start.detach()) * t
        chunks = current.split([p.numel() for p in model.parameters()])
        model.load_state_dict(
            {n: c.view_as(p) for n, c, p in zip(names, chunks, model.parameters())}
        )
        out = model(x)
        if logit_mask is not None:
            out.data[:, ~logit_mask] = -10e10
        (F.cross_entropy(out, y) / len(y)).backward()
        grads = torch.cat([p.grad.view(-1) for p in model.parameters()])
        accum = grads if accum is None else accum + grads
    return accum


@pytest.mark.parametrize("weighting", ["reference", "uniform"])
@pytest.mark.parametrize("backend", ["vmap", "affine"])
def test_mlp_backends_agree_with_the_loop(mlp_case, weighting: str, backend: str) -> None:
    net, start, end, x, y = mlp_case
    expected, expected_losses = LineGradient(net, K, weighting, "loop")(start, end, x, y)
    grad, losses = LineGradient(net, K, weighting, backend)(start, end, x, y)
    assert grad.shape == start.shape and losses.shape == (K + 1,)
    assert relative_error(grad, expected) <= 1e-5
    torch.testing.assert_close(losses, expected_losses)


@pytest.mark.parametrize("weighting", ["reference", "uniform"])
def test_resnet18_vmap_agrees_with_the_loop(resnet_case, weighting: str) -> None:
    net, start, end, x, y = resnet_case
    expected, expected_losses = LineGradient(net, K, weighting, "loop")(start, end, x, y)
    grad, losses = LineGradient(net, K, weighting, "vmap")(start, end, x, y)
    assert relative_error(grad, expected) <= 1e-10
    torch.testing.assert_close(losses, expected_losses)


def test_affine_backend_handles_an_mlp_without_hidden_layers() -> None:
    net = MLP(input_size=12, hidden_sizes=[], num_classes=4)
    net, start, end, x, y = make_case(net, torch.rand(9, 12), 4)
    expected, _ = LineGradient(net, K, "uniform", "loop")(start, end, x, y)
    grad, _ = LineGradient(net, K, "uniform", "affine")(start, end, x, y)
    assert relative_error(grad, expected) <= 1e-5


@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_reference_weighting_reproduces_the_research_code(mlp_case, backend: str) -> None:
    net, start, end, x, y = mlp_case
    grad, _ = LineGradient(net, K, "reference", backend)(start, end, x, y)
    assert relative_error(grad, research_line_gradient(net, start, end, x, y)) <= 1e-5


def test_reference_weighting_reproduces_the_research_code_on_masked_resnet18(resnet_case) -> None:
    net, start, end, x, _ = resnet_case
    mask = torch.zeros(20, dtype=torch.bool)
    mask[5:10] = True  # split CIFAR's second task
    y = torch.randint(5, 10, (x.shape[0],))
    expected = research_line_gradient(net, start, end, x, y, mask)
    grad, _ = LineGradient(net, K, "reference", "vmap")(start, end, x, y, mask)
    assert relative_error(grad, expected) <= 1e-10


def test_uniform_weighting_is_the_mean_of_the_point_gradients(mlp_case) -> None:
    net, start, end, x, y = mlp_case
    point_grads = []
    for point in point_nets(net, start, end):
        F.cross_entropy(point(x), y).backward()
        point_grads.append(parameters_to_vector(p.grad for p in point.parameters()))
    grad, _ = LineGradient(net, K, "uniform")(start, end, x, y)
    assert relative_error(grad, torch.stack(point_grads).mean(0)) <= 1e-5


def test_point_weights() -> None:
    net = MLP(input_size=4, hidden_sizes=[3], num_classes=2)
    torch.testing.assert_close(
        LineGradient(net, 5, "reference").point_weights(10),
        torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64) / 10,
    )
    torch.testing.assert_close(
        LineGradient(net, 3, "uniform").point_weights(10),
        torch.full((4,), 0.25, dtype=torch.float64),
    )
    torch.testing.assert_close(  # a batch of 10 in a step over 40 examples: divided by 40
        LineGradient(net, 5, "reference").point_weights(10, share=0.25),
        torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64) / 40,
    )
    torch.testing.assert_close(
        LineGradient(net, 3, "uniform").point_weights(10, share=0.5),
        torch.full((4,), 0.125, dtype=torch.float64),
    )


@pytest.mark.parametrize("weighting", ["reference", "uniform"])
@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_share_scales_the_gradient_and_not_the_losses(mlp_case, weighting: str, backend: str) -> None:
    net, start, end, x, y = mlp_case
    line = LineGradient(net, K, weighting, backend)
    grad, losses = line(start, end, x, y)
    shared_grad, shared_losses = line(start, end, x, y, share=0.3)
    assert relative_error(shared_grad, 0.3 * grad) <= 1e-6
    assert torch.equal(shared_losses, losses)


@pytest.mark.parametrize("backend", ["loop", "affine"])
def test_uniform_shares_over_batches_give_the_mean_over_all_examples(mlp_case, backend: str) -> None:
    # a step over several batches (MC-SGD's full-batch consolidation): batch b at share B_b / N
    net, start, end, x, y = mlp_case
    line = LineGradient(net, K, "uniform", backend)
    parts = [line(start, end, x[i:j], y[i:j], share=(j - i) / len(y))[0] for i, j in ((0, 11), (11, 16))]
    assert relative_error(parts[0] + parts[1], line(start, end, x, y)[0]) <= 1e-5


@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_point_losses_run_from_start_to_end(mlp_case, backend: str) -> None:
    net, start, end, x, y = mlp_case
    _, losses = LineGradient(net, K, "reference", backend)(start, end, x, y)
    expected = torch.stack([F.cross_entropy(point(x), y) for point in point_nets(net, start, end)])
    assert not losses.requires_grad
    torch.testing.assert_close(losses, expected.detach())
    with torch.no_grad():
        torch.testing.assert_close(losses[0], F.cross_entropy(net(x), y))  # net holds start


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_logit_mask_blocks_the_masked_classes(mlp_case, backend: str, per_sample: bool) -> None:
    net, start, end, x, _ = mlp_case
    allowed = torch.tensor([2, 3, 4])
    mask = torch.zeros(10, dtype=torch.bool)
    mask[allowed] = True
    y = allowed[torch.randint(0, 3, (x.shape[0],))]
    if per_sample:
        mask = mask.expand(x.shape[0], -1)
    grad, losses = LineGradient(net, K, "uniform", backend)(start, end, x, y, mask)

    as_net = copy.deepcopy(net)
    vector_to_parameters(grad, as_net.parameters())
    last = as_net.layers[-1]
    assert torch.all(last.weight[~mask.view(-1, 10)[0]] == 0)
    assert torch.all(last.bias[~mask.view(-1, 10)[0]] == 0)
    assert torch.all(last.weight[allowed].abs().sum(1) > 0)
    with torch.no_grad():  # the loss is the cross-entropy over the allowed classes only
        torch.testing.assert_close(losses[0], F.cross_entropy(net(x)[:, allowed], y - 2))


@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_the_network_is_left_untouched(mlp_case, backend: str) -> None:
    net, start, end, x, y = mlp_case
    before = copy.deepcopy(net.state_dict())
    LineGradient(net, K, "reference", backend)(start, end, x, y)
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in net.parameters())


def test_running_statistics_are_not_updated() -> None:
    """A training-mode BatchNorm that tracks statistics would update them in place; the loop
    backend runs it (vmap cannot) on buffer clones, so the module's own stay as they were."""
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    start = parameters_to_vector(net.parameters()).detach()
    before = copy.deepcopy(net.state_dict())
    x, y = torch.rand(10, 6), torch.randint(0, 3, (10,))
    LineGradient(net, K, "uniform", "loop")(start, start + 0.1, x, y)
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_works_where_gradients_are_off(mlp_case, context) -> None:
    """Lightning runs validation under inference mode; the line search must still work."""
    net, start, end, x, y = mlp_case
    line = LineGradient(net, K, "reference")
    expected, _ = line(start, end, x, y)
    with context():
        inner_start, inner_end, inner_x = start.detach().clone(), end.clone(), x.clone()
        grad, _ = line(inner_start, inner_end, inner_x, y)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("backend", ["vmap", "affine"])
def test_batched_backends_refuse_training_mode_dropout(mlp_case, backend: str) -> None:
    net, start, end, x, y = mlp_case
    with pytest.raises(RuntimeError, match="eval"):
        LineGradient(net.train(), K, "uniform", backend)(start, end, x, y)


def test_auto_backend_choice() -> None:
    cpu = torch.device("cpu")
    assert LineGradient(MLP()).resolve_backend(cpu) == "affine"
    assert LineGradient(ResNet18(width=2)).resolve_backend(cpu) == "loop"
    assert LineGradient(ResNet18(width=2)).resolve_backend(torch.device("cuda")) == "vmap"
    assert LineGradient(MLP(), backend="vmap").resolve_backend(cpu) == "vmap"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_runs_on_the_inputs_device(mlp_case, backend: str) -> None:
    net, start, end, x, y = mlp_case
    expected, _ = LineGradient(net, K, "reference", "loop")(start, end, x, y)
    gpu = torch.device("cuda")
    grad, losses = LineGradient(net.to(gpu), K, "reference", backend)(
        start.to(gpu), end.to(gpu), x.to(gpu), y.to(gpu)
    )
    assert grad.device.type == losses.device.type == "cuda"
    assert relative_error(grad.cpu(), expected) <= 1e-4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_segments": 0},
        {"weighting": "triangular"},
        {"backend": "jit"},
    ],
)
def test_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LineGradient(MLP(), **kwargs)


def test_affine_backend_needs_an_mlp() -> None:
    with pytest.raises(ValueError, match="affine"):
        LineGradient(ResNet18(width=2), backend="affine")


def test_rejects_vectors_of_the_wrong_size(mlp_case) -> None:
    net, start, end, x, y = mlp_case
    with pytest.raises(ValueError, match="flat vectors"):
        LineGradient(net)(start[:-1], end, x, y)
    with pytest.raises(ValueError, match="logit_mask"):
        LineGradient(net)(start, end, x, y, torch.ones(10))
