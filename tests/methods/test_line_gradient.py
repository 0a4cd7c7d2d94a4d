"""MC-SGD's line gradient over a population: backends agree, the reference weighting is the research
code's for every member, and member k of N is the population of one holding member k."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import vector_to_parameters

from cl_lightning.methods.line_gradient import LineGradient
from cl_lightning.models.nets import MLP, ResNet18
from cl_lightning.models.population import Population, init_member

K = 5
SEEDS = (0, 1, 2)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


class Case:
    """An eval-mode population with one segment (start, end) per member and a labelled batch per member."""

    def __init__(self, build, x: Tensor, num_classes: int, seeds=SEEDS, seed: int = 0) -> None:
        self.build, self.seeds = build, list(seeds)
        self.pop = Population.from_seeds(build, self.seeds).eval()
        torch.manual_seed(seed)
        self.start = self.pop.flat()
        self.end = self.start + 0.05 * torch.randn_like(self.start)
        self.x = x
        self.y = torch.randint(0, num_classes, x.shape[:2])

    @property
    def args(self):
        return self.start, self.end, self.x, self.y

    def solo_net(self) -> nn.Module:
        """A solo network of the members' architecture (its weights are overwritten where used)."""
        return init_member(self.build, 0).to(self.start.dtype).eval()

    def alone(self, k: int) -> "Case":
        """The population of one holding member k, with member k's segment and batch."""
        single = copy.copy(self)
        single.seeds = [self.seeds[k]]
        single.pop = Population.from_seeds(self.build, single.seeds).to(self.start.dtype).eval()
        single.start, single.end, single.x, single.y = (t[k : k + 1] for t in self.args)
        return single


def small_mlp() -> nn.Module:
    return MLP(input_size=64, hidden_sizes=[32, 32], dropout=0.2)


@pytest.fixture
def mlp_case() -> Case:
    torch.manual_seed(0)
    return Case(small_mlp, torch.rand(len(SEEDS), 16, 1, 8, 8), 10)


def small_resnet() -> nn.Module:
    return ResNet18(num_classes=20, width=8).double()


@pytest.fixture(scope="module")
def resnet_case() -> Case:
    """Float64: with batch-statistics BatchNorm, float32 gradients of this net carry ~0.3 %
    rounding error (loop and vmap alike, measured against float64), too much to compare.
    Width 8 and two members keep the float64 convolutions cheap; the architecture is the paper's."""
    torch.manual_seed(0)
    return Case(small_resnet, torch.rand(2, 8, 3, 32, 32, dtype=torch.float64), 20, seeds=(0, 1))


def point_nets(net: nn.Module, start: Tensor, end: Tensor) -> list[nn.Module]:
    """Independent copies of the solo ``net`` holding theta_j = start + j/K (end - start)."""
    copies = []
    for alpha in torch.linspace(0, 1, K + 1, dtype=start.dtype):
        point = copy.deepcopy(net)
        vector_to_parameters(torch.lerp(start, end, alpha), point.parameters())
        copies.append(point)
    return copies


def research_line_gradient(net, start, end, x, y, logit_mask=None) -> Tensor:
    """Literal emulation of the research code's ``get_line_loss`` (CL-LinearModeConnectivity,
    core/mode_connectivity.py) for one solo network: one model whose weights are overwritten with
    load_state_dict at each point, ``.grad`` never zeroed, (batch-mean CE / batch size).backward(),
    and the running ``.grad`` sums summed; task masking by writing -10e10 into ``logits.data``."""
    model = copy.deepcopy(net).eval()
    names = [name for name, _ in model.named_parameters()]
    accum = None
    for t in np.arange(0.0, 1.01, 1.0 / K):
        current = start + (end - start) * t
        chunks = current.split([p.numel() for p in model.parameters()])
        model.load_state_dict({n: c.view_as(p) for n, c, p in zip(names, chunks, model.parameters())})
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
    expected, expected_losses = LineGradient(mlp_case.pop, K, weighting, "loop")(*mlp_case.args)
    grad, losses = LineGradient(mlp_case.pop, K, weighting, backend)(*mlp_case.args)
    assert grad.shape == mlp_case.start.shape and losses.shape == (len(SEEDS), K + 1)
    for k in range(len(SEEDS)):
        assert relative_error(grad[k], expected[k]) <= 1e-5
    torch.testing.assert_close(losses, expected_losses)


@pytest.mark.parametrize("weighting", ["reference", "uniform"])
def test_resnet18_vmap_agrees_with_the_loop(resnet_case, weighting: str) -> None:
    expected, expected_losses = LineGradient(resnet_case.pop, K, weighting, "loop")(*resnet_case.args)
    grad, losses = LineGradient(resnet_case.pop, K, weighting, "vmap")(*resnet_case.args)
    for k in range(2):
        assert relative_error(grad[k], expected[k]) <= 1e-10
    torch.testing.assert_close(losses, expected_losses)


@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_member_k_is_the_population_of_one_holding_it(mlp_case, backend: str) -> None:
    # bitwise on CPU with one thread (conftest); each member's slices run the same kernels whatever N
    grad, losses = LineGradient(mlp_case.pop, K, "reference", backend)(*mlp_case.args)
    for k in range(len(SEEDS)):
        alone = mlp_case.alone(k)
        grad_alone, losses_alone = LineGradient(alone.pop, K, "reference", backend)(*alone.args)
        assert torch.equal(grad[k], grad_alone[0]) and torch.equal(losses[k], losses_alone[0])


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_resnet18_member_k_is_the_population_of_one_holding_it(resnet_case, backend: str) -> None:
    # vmapped convolutions are grouped ones whose grouping depends on N: float tolerance only
    grad, losses = LineGradient(resnet_case.pop, K, "reference", backend)(*resnet_case.args)
    alone = resnet_case.alone(1)
    grad_alone, losses_alone = LineGradient(alone.pop, K, "reference", backend)(*alone.args)
    assert relative_error(grad[1], grad_alone[0]) <= 1e-12
    torch.testing.assert_close(losses[1], losses_alone[0])


@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_a_diverged_member_leaves_the_others_alone(mlp_case, backend: str) -> None:
    line = LineGradient(mlp_case.pop, K, "reference", backend)
    grad, losses = line(*mlp_case.args)
    start = mlp_case.start.clone()
    start[0, :100] = float("nan")
    grad_nan, losses_nan = line(start, mlp_case.end, mlp_case.x, mlp_case.y)
    assert grad_nan[0].isnan().any() and losses_nan[0].isnan().any()
    assert torch.equal(grad_nan[1:], grad[1:]) and torch.equal(losses_nan[1:], losses[1:])


def test_affine_backend_handles_an_mlp_without_hidden_layers() -> None:
    case = Case(lambda: MLP(input_size=12, hidden_sizes=[], num_classes=4), torch.rand(2, 9, 12), 4, seeds=(0, 1))
    expected, _ = LineGradient(case.pop, K, "uniform", "loop")(*case.args)
    grad, _ = LineGradient(case.pop, K, "uniform", "affine")(*case.args)
    assert relative_error(grad, expected) <= 1e-5


@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_reference_weighting_reproduces_the_research_code(mlp_case, backend: str) -> None:
    grad, _ = LineGradient(mlp_case.pop, K, "reference", backend)(*mlp_case.args)
    net = mlp_case.solo_net()
    for k in range(len(SEEDS)):
        expected = research_line_gradient(net, *(t[k] for t in mlp_case.args))
        assert relative_error(grad[k], expected) <= 1e-5


def test_reference_weighting_reproduces_the_research_code_on_masked_resnet18(resnet_case) -> None:
    mask = torch.zeros(20, dtype=torch.bool)
    mask[5:10] = True  # split CIFAR's second task
    y = torch.randint(5, 10, resnet_case.y.shape)
    grad, _ = LineGradient(resnet_case.pop, K, "reference", "vmap")(
        resnet_case.start, resnet_case.end, resnet_case.x, y, mask.expand(2, -1))
    net = resnet_case.solo_net()
    for k in range(2):
        expected = research_line_gradient(net, resnet_case.start[k], resnet_case.end[k], resnet_case.x[k], y[k], mask)
        assert relative_error(grad[k], expected) <= 1e-10


def test_uniform_weighting_is_the_mean_of_the_point_gradients(mlp_case) -> None:
    grad, _ = LineGradient(mlp_case.pop, K, "uniform")(*mlp_case.args)
    net = mlp_case.solo_net()
    for k in range(len(SEEDS)):
        point_grads = []
        for point in point_nets(net, mlp_case.start[k], mlp_case.end[k]):
            F.cross_entropy(point(mlp_case.x[k]), mlp_case.y[k]).backward()
            point_grads.append(torch.cat([p.grad.view(-1) for p in point.parameters()]))
        assert relative_error(grad[k], torch.stack(point_grads).mean(0)) <= 1e-5


def test_point_weights(mlp_case) -> None:
    pop = mlp_case.pop
    torch.testing.assert_close(
        LineGradient(pop, 5, "reference").point_weights(10),
        torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64) / 10,
    )
    torch.testing.assert_close(
        LineGradient(pop, 3, "uniform").point_weights(10),
        torch.full((4,), 0.25, dtype=torch.float64),
    )
    torch.testing.assert_close(  # a batch of 10 in a step over 40 examples: divided by 40
        LineGradient(pop, 5, "reference").point_weights(10, share=0.25),
        torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64) / 40,
    )
    torch.testing.assert_close(
        LineGradient(pop, 3, "uniform").point_weights(10, share=0.5),
        torch.full((4,), 0.125, dtype=torch.float64),
    )


@pytest.mark.parametrize("weighting", ["reference", "uniform"])
@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_share_scales_the_gradient_and_not_the_losses(mlp_case, weighting: str, backend: str) -> None:
    line = LineGradient(mlp_case.pop, K, weighting, backend)
    grad, losses = line(*mlp_case.args)
    shared_grad, shared_losses = line(*mlp_case.args, share=0.3)
    assert relative_error(shared_grad, 0.3 * grad) <= 1e-6
    assert torch.equal(shared_losses, losses)


@pytest.mark.parametrize("backend", ["loop", "affine"])
def test_uniform_shares_over_batches_give_the_mean_over_all_examples(mlp_case, backend: str) -> None:
    # a step over several batches (MC-SGD's full-batch consolidation): batch b at share B_b / M
    start, end, x, y = mlp_case.args
    line = LineGradient(mlp_case.pop, K, "uniform", backend)
    parts = [line(start, end, x[:, i:j], y[:, i:j], share=(j - i) / y.shape[1])[0] for i, j in ((0, 11), (11, 16))]
    assert relative_error(parts[0] + parts[1], line(start, end, x, y)[0]) <= 1e-5


@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_point_losses_run_from_start_to_end(mlp_case, backend: str) -> None:
    _, losses = LineGradient(mlp_case.pop, K, "reference", backend)(*mlp_case.args)
    assert not losses.requires_grad
    net = mlp_case.solo_net()
    with torch.no_grad():
        for k in range(len(SEEDS)):
            points = point_nets(net, mlp_case.start[k], mlp_case.end[k])
            expected = torch.stack([F.cross_entropy(point(mlp_case.x[k]), mlp_case.y[k]) for point in points])
            torch.testing.assert_close(losses[k], expected)
        torch.testing.assert_close(  # the population holds start
            losses[:, 0], F.cross_entropy(mlp_case.pop(mlp_case.x).flatten(0, 1), mlp_case.y.flatten(), reduction="none")
            .view(len(SEEDS), -1).mean(1))


@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_logit_mask_blocks_the_masked_classes(mlp_case, backend: str, per_example: bool) -> None:
    start, end, x, _ = mlp_case.args
    n, batch = x.shape[:2]
    allowed = torch.tensor([[2, 3, 4], [5, 6, 7], [0, 1, 9]])  # each member its own task's classes
    mask = torch.zeros(n, 10, dtype=torch.bool).scatter_(1, allowed, True)
    y = allowed.gather(1, torch.randint(0, 3, (n, batch)))
    grad, losses = LineGradient(mlp_case.pop, K, "uniform", backend)(
        start, end, x, y, mask[:, None].expand(n, batch, 10) if per_example else mask)

    net = mlp_case.solo_net()
    for k in range(n):
        as_net = copy.deepcopy(net)
        vector_to_parameters(grad[k], as_net.parameters())
        last = as_net.layers[-1]
        assert torch.all(last.weight[~mask[k]] == 0) and torch.all(last.bias[~mask[k]] == 0)
        assert torch.all(last.weight[mask[k]].abs().sum(1) > 0)
        with torch.no_grad():  # the loss is the cross-entropy over the allowed classes only
            vector_to_parameters(start[k], as_net.parameters())
            targets = (allowed[k][None] == y[k][:, None]).int().argmax(1)
            torch.testing.assert_close(losses[k, 0], F.cross_entropy(as_net(x[k])[:, allowed[k]], targets))


@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_the_population_is_left_untouched(mlp_case, backend: str) -> None:
    before = copy.deepcopy(mlp_case.pop.state_dict())
    LineGradient(mlp_case.pop, K, "reference", backend)(*mlp_case.args)
    for name, value in mlp_case.pop.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in mlp_case.pop.parameters())


def test_running_statistics_are_not_updated() -> None:
    """A training-mode BatchNorm that tracks statistics would update them in place; the loop
    backend runs it (the pairs' vmap cannot) on buffer clones, so the population's own stay as they were."""
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    pop = Population.from_seeds(build, [0, 1]).train()
    start = pop.flat()
    before = copy.deepcopy(pop.state_dict())
    x, y = torch.rand(2, 10, 6), torch.randint(0, 3, (2, 10))
    grad, _ = LineGradient(pop, K, "uniform", "loop")(start, start + 0.1, x, y)
    assert grad.isfinite().all() and grad.abs().sum() > 0
    for name, value in pop.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_works_where_gradients_are_off(mlp_case, context) -> None:
    """Lightning runs validation under inference mode; the line search must still work."""
    line = LineGradient(mlp_case.pop, K, "reference")
    expected, _ = line(*mlp_case.args)
    with context():
        grad, _ = line(*(t.clone() for t in mlp_case.args))
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_backends_refuse_training_mode_dropout(mlp_case, backend: str) -> None:
    with pytest.raises(RuntimeError, match="eval"):
        LineGradient(mlp_case.pop.train(), K, "uniform", backend)(*mlp_case.args)


def test_auto_backend_choice() -> None:
    cpu = torch.device("cpu")
    mlp, resnet = Population.from_seeds(MLP, [0]), Population.from_seeds(lambda: ResNet18(width=2), [0])
    assert LineGradient(mlp).resolve_backend(cpu) == "affine"
    assert LineGradient(resnet).resolve_backend(cpu) == "loop"
    assert LineGradient(resnet).resolve_backend(torch.device("cuda")) == "vmap"
    assert LineGradient(mlp, backend="vmap").resolve_backend(cpu) == "vmap"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["loop", "vmap", "affine"])
def test_runs_on_the_inputs_device(mlp_case, backend: str) -> None:
    expected, _ = LineGradient(mlp_case.pop, K, "reference", "loop")(*mlp_case.args)
    gpu = torch.device("cuda")
    grad, losses = LineGradient(mlp_case.pop.to(gpu), K, "reference", backend)(*(t.to(gpu) for t in mlp_case.args))
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
        LineGradient(Population.from_seeds(MLP, [0]), **kwargs)


def test_affine_backend_needs_an_mlp() -> None:
    with pytest.raises(ValueError, match="affine"):
        LineGradient(Population.from_seeds(lambda: ResNet18(width=2), [0]), backend="affine")


def test_rejects_inputs_of_the_wrong_shapes(mlp_case) -> None:
    start, end, x, y = mlp_case.args
    line = LineGradient(mlp_case.pop)
    with pytest.raises(ValueError, match="flat vectors"):
        line(start[:, :-1], end, x, y)
    with pytest.raises(ValueError, match="flat vectors"):
        line(start[0], end[0], x[0], y[0])
    with pytest.raises(ValueError, match=r"x must be \[N=3, B"):
        line(start, end, x[:2], y[:2])
    with pytest.raises(ValueError, match="logit_mask"):
        line(start, end, x, y, torch.ones(3, 10))
    with pytest.raises(ValueError, match="logit_mask"):
        line(start, end, x, y, torch.ones(10, dtype=torch.bool))
