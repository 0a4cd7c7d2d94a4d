"""MC-SGD's line gradient: loss gradients at evenly spaced points of a segment in weight space,
for every member of a population at once.

MC-SGD (Mirzadeh et al., ICLR 2021) consolidates a task by moving the kept weights ``w`` so
that the loss stays low along the segments from earlier solutions ``s`` to ``w``. Its research
code (``imirzadeh/CL-LinearModeConnectivity``, ``core/mode_connectivity.py:get_line_loss``)
evaluates the network at the K+1 points

    theta_j = s + alpha_j * (w - s),   alpha_j = j / K,   j = 0..K   (both ends included)

and applies the loss gradient *taken at each point* (no chain-rule factor alpha_j) to ``w``.
:class:`LineGradient` computes that update direction, either with the research code's
weighting or with a clean uniform mean; see :class:`LineGradient` for the formulas.

A population (:class:`~cl_lightning.models.population.Population`) holds N members; each has its
own segment and its own batch. Everything works on ``[N, P]`` matrices of flat parameter vectors
whose row k is member k's vector in the layout of
``torch.nn.utils.parameters_to_vector(net.parameters())`` of a solo network, which is how MC-SGD
stores its solutions (w_hat, w_bar). The computation for one member is written once and
``torch.func.vmap``-ed over the members, so member k's gradient depends on member k's segment
and batch alone (a NaN in one member cannot reach another) and a population of one is the solo
computation.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from cl_lightning.errors import ConfigError
from cl_lightning.models.module import mask_logits
from cl_lightning.models.nets import is_plain_mlp
from cl_lightning.models.params import outside_inference
from cl_lightning.models.population import Population

__all__ = ["LineGradient"]

Weighting = Literal["reference", "uniform"]
Backend = Literal["auto", "vmap", "loop", "affine"]


class LineGradient:
    """Combined loss gradient at the K+1 points of a segment, per population member, as MC-SGD's
    consolidation uses it.

    With ``alpha_j = j / K`` and, for member k, ``theta_kj = start_k + alpha_j * (end_k - start_k)``:

    - ``weighting="reference"`` reproduces the research code, which never zeroed ``.grad``
      between points, summed the running sums, and divided each batch-mean cross-entropy once
      more by the batch size ``B``:
      ``g_k = sum_j (K + 1 - j) * grad CE_k(theta_kj) / B`` (weights 6, 5, 4, 3, 2, 1 for K = 5,
      largest at ``start``). Use it to reproduce the paper's numbers and learning rates.
    - ``weighting="uniform"`` is the clean alternative, the mean of the point gradients:
      ``g_k = 1 / (K + 1) * sum_j grad CE_k(theta_kj)``. It needs different learning rates.

    In both, each gradient is taken with respect to the point's own parameters, then applied
    as is: this is not ``d/d end`` of a line loss, which would carry an extra factor
    ``alpha_j``. ``CE_k`` is member k's batch-mean cross-entropy on its own batch.

    Every backend runs the stacked network under ``torch.func.functional_call`` inside a
    ``torch.func.vmap`` whose every slice is one member at one point (as
    :meth:`Population.forward <cl_lightning.models.population.Population.forward>` runs one
    member), so member k's gradient depends on its own segment and batch alone. They differ in
    how they cover the K+1 points (all give the same result up to float rounding):

    - ``"vmap"``: one ``vmap(grad(...))`` over all N * (K+1) (member, point) pairs.
    - ``"loop"``: K+1 sequential ``vmap(grad(...))`` over the N members. It runs what the pairs'
      vmap cannot batch: a training-mode BatchNorm that tracks running statistics updates them
      in place (on clones), point after point, as the research code's sequential points did.
    - ``"affine"``: only for :class:`~cl_lightning.models.nets.MLP`. The first layer's
      pre-activation is affine in alpha, ``x W_s^T + b_s + alpha_j (x D^T + d_b)``, so it
      costs 2 matmuls per member instead of K+1 (plus one for its summed weight gradient); the
      rest of the network is vmapped over the pairs. That layer holds most of an MNIST MLP's
      FLOPs.
    - ``"auto"``: ``"affine"`` for an ``MLP``; otherwise ``"loop"`` on CPU and ``"vmap"`` on
      other devices. On CPU ``vmap`` over the points turns the per-point convolutions of
      ``ResNet18`` into grouped convolutions, measured (solo, before populations) 1.4x (batch 5)
      to 5x (batch 64) *slower* than the loop; on GPUs batching removes K+1 rounds of kernel
      launches, which is where it should pay.

    Member k of a population of N gets bitwise the gradient of a population of one holding
    member k on CPU with one thread (the tests' and the command line's setting); with several
    threads a batched matmul may split its work differently for N = 1 and round differently.

    Modes are the caller's business: put the population in ``eval()`` mode first, as MC-SGD does
    (dropout off). Every backend refuses an active dropout: the population's counter-based masks
    are keyed by the training step, so the line would reuse the masks of the last training step.
    ``ResNet18``'s BatchNorm with ``bn_stats="batch"`` has no running statistics, so each point
    is normalised with its own batch statistics in either mode, as in the research code.

    The population itself is never modified: parameters come from ``start``/``end`` through
    ``torch.func.functional_call``, and buffers are passed as clones. Calls work inside
    Lightning hooks (grad mode is forced on, inference mode off) and on whatever device the
    inputs live on (the population must be on that device too).

    Args:
        population: The population whose members' parameters the ``[N, P]`` matrices describe.
            Its networks must return logits.
        num_segments: K, the number of segments; the gradient is taken at K+1 points.
        weighting: ``"reference"`` (research code) or ``"uniform"`` (mean over points).
        backend: ``"auto"``, ``"vmap"``, ``"loop"`` or ``"affine"`` (see above).
    """

    def __init__(
        self,
        population: Population,
        num_segments: int = 5,
        weighting: Weighting = "reference",
        backend: Backend = "auto",
    ) -> None:
        if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
            raise ConfigError(f"num_segments must be a positive integer, got {num_segments!r}")
        if weighting not in get_args(Weighting):
            raise ConfigError(f"weighting must be one of {get_args(Weighting)}, got {weighting!r}")
        if backend not in get_args(Backend):
            raise ConfigError(f"backend must be one of {get_args(Backend)}, got {backend!r}")
        if backend == "affine" and not is_plain_mlp(population.stacked):
            raise ConfigError(
                f"backend 'affine' needs a cl_lightning.models.nets.MLP, got {type(population.stacked).__name__}"
            )
        self.population = population
        self.num_segments = num_segments
        self.weighting: Weighting = weighting
        self.backend: Backend = backend

    def resolve_backend(self, device: torch.device) -> Literal["vmap", "loop", "affine"]:
        """The backend a call on ``device`` uses: ``backend`` itself unless it is ``"auto"``."""
        if self.backend != "auto":
            return self.backend
        if is_plain_mlp(self.population.stacked):
            return "affine"
        return "loop" if device.type == "cpu" else "vmap"

    def point_weights(self, batch_size: int, share: float = 1.0) -> Tensor:
        """The factor ``c_j`` multiplying each point's batch-mean gradient, shape ``(K+1,)``,
        the same for every member (the batch size is shared).

        ``share`` scales every factor: the batch's share of the examples one step's loss is
        taken over (see ``__call__``).
        """
        points = self.num_segments + 1
        if self.weighting == "reference":
            return torch.arange(points, 0, -1, dtype=torch.float64) * share / batch_size
        return torch.full((points,), share / points, dtype=torch.float64)

    def __call__(
        self,
        start: Tensor,
        end: Tensor,
        x: Tensor,
        y: Tensor,
        logit_mask: Tensor | None = None,
        share: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """Compute every member's line gradient on its batch.

        Args:
            start: ``[N, P]``: row k is member k's segment's fixed end ``s`` (``alpha = 0``).
            end: ``[N, P]``: row k is member k's ``w`` being optimised (``alpha = 1``).
            x: Inputs ``[N, B, ...]``: row k is member k's batch.
            y: Integer class targets, ``[N, B]``.
            logit_mask: Optional bool mask ``[N, C]`` (one per member) or ``[N, B, C]`` (one per
                example); logits where it is False are set to ``MASKED_LOGIT`` before the
                cross-entropy (split CIFAR task masking), so they get no gradient.
            share: This batch's share ``B / M`` of the ``M`` examples one optimizer step's loss
                is taken over, when the step spans several batches of a line; the gradient is
                multiplied by it. With ``weighting="reference"`` it turns the research code's
                division by the batch size ``B`` into a division by ``M``: its full-batch
                consolidation (CL-LinearModeConnectivity 177f216, ``get_clf_loss``) divided the
                sum of the batch-mean losses by the line's number of examples. With
                ``"uniform"``, summing over the batches gives the mean over the ``M`` examples.
                1 (the default) is a step on this batch alone.

        Returns:
            The combined gradients ``[N, P]`` (row k to be applied to member k's ``end``; dtype of
            ``start``) and each member's batch-mean cross-entropy at each point, ``[N, K+1]``,
            detached.
        """
        self._check_inputs(start, end, x, y, logit_mask)
        backend = self.resolve_backend(start.device)
        if self.population.has_active_dropout():
            raise RuntimeError(
                f"backend {backend!r} would apply the dropout masks of the last training step: "
                "put the population in eval() mode first, as MC-SGD does"
            )
        with torch.inference_mode(False), torch.enable_grad():
            # Tensors made under inference mode cannot be saved for backward; clones can.
            start, end, x, y = (outside_inference(t.detach()) for t in (start, end, x, y))
            if logit_mask is not None:
                logit_mask = outside_inference(logit_mask)
            alphas = torch.arange(self.num_segments + 1, device=start.device, dtype=start.dtype)
            alphas = alphas / self.num_segments
            weights = self.point_weights(x.shape[1], share).to(device=start.device, dtype=start.dtype)
            compute = {"vmap": self._vmap, "loop": self._loop, "affine": self._affine}[backend]
            grad, losses = compute(start, end, alphas, weights, x, y, logit_mask)
        return grad, losses.detach()

    def _check_inputs(self, start: Tensor, end: Tensor, x: Tensor, y: Tensor, logit_mask: Tensor | None) -> None:
        n = self.population.size
        num_params = sum(p[0].numel() for p in self.population.stacked.parameters())
        if start.shape != (n, num_params) or end.shape != (n, num_params):
            raise ValueError(
                f"start and end must be [N={n}, P={num_params}]: flat vectors of each member's parameters, "
                f"got shapes {tuple(start.shape)} and {tuple(end.shape)}"
            )
        if x.dim() < 3 or x.shape[0] != n or y.shape != x.shape[:2]:
            raise ValueError(f"x must be [N={n}, B, ...] and y [N, B], got {tuple(x.shape)} and {tuple(y.shape)}")
        if logit_mask is not None and (
            logit_mask.dtype != torch.bool
            or logit_mask.dim() not in (2, 3)
            or logit_mask.shape[0] != n
            or (logit_mask.dim() == 3 and logit_mask.shape[1] != x.shape[1])
        ):
            raise ValueError(
                f"logit_mask must be a bool tensor of shape [N={n}, num_classes] or [N, B={x.shape[1]}, num_classes], "
                f"got {logit_mask.dtype} of shape {tuple(logit_mask.shape)}"
            )

    def _vmap(self, start: Tensor, end: Tensor, alphas: Tensor, weights: Tensor, x: Tensor, y: Tensor,
              logit_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        stacked = self.population.stacked
        points = torch.lerp(start[:, None], end[:, None], alphas[:, None])  # [N, K+1, P]; lerp is exact at both ends
        grads, losses = _pair_gradients(stacked, _pairs(points), _buffer_clones(stacked, len(alphas)),
                                        *(_per_point(t, len(alphas)) for t in (x, y, logit_mask)))
        return _weighted_sum(weights, grads.view_as(points)), losses.view(points.shape[:2])

    def _loop(self, start: Tensor, end: Tensor, alphas: Tensor, weights: Tensor, x: Tensor, y: Tensor,
              logit_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        stacked = self.population.stacked
        buffers = _buffer_clones(stacked, 1)
        grads, losses = zip(*(_pair_gradients(stacked, torch.lerp(start, end, alpha), buffers, x, y, logit_mask)
                              for alpha in alphas))
        return _weighted_sum(weights, torch.stack(grads, dim=1)), torch.stack(losses, dim=1)

    def _affine(self, start: Tensor, end: Tensor, alphas: Tensor, weights: Tensor, x: Tensor, y: Tensor,
                logit_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        first: nn.Linear = self.population.stacked.layers[0]
        rest: nn.Sequential = self.population.stacked.layers[1:]  # shares the modules; keys stay "1", "2", ...
        n, hidden, features = first.weight.shape
        sizes = [hidden * features, hidden, start.shape[1] - hidden * (features + 1)]
        w_start, b_start, rest_start = start.split(sizes, dim=1)
        w_end, b_end, rest_end = end.split(sizes, dim=1)

        inputs = x.flatten(2)  # [N, B, features], as MLP.forward flattens each member's batch
        base = torch.baddbmm(b_start[:, None], inputs, w_start.view(n, hidden, features).transpose(1, 2))
        direction = torch.baddbmm((b_end - b_start)[:, None], inputs,
                                  (w_end - w_start).view(n, hidden, features).transpose(1, 2))
        pre_activations = base[:, None] + alphas[:, None, None] * direction[:, None]  # [N, K+1, B, hidden]
        rest_points = torch.lerp(rest_start[:, None], rest_end[:, None], alphas[:, None])  # [N, K+1, P_rest]
        (pre_grads, rest_grads), losses = _pair_gradients(
            rest, _pairs(rest_points), _buffer_clones(rest, len(alphas)), _pairs(pre_activations),
            *(_per_point(t, len(alphas)) for t in (y, logit_mask)), wrt_input=True,
        )
        # sum_j c_j * (delta_j^T x) = (sum_j c_j delta_j)^T x: one matmul per member for the first layer.
        delta = _weighted_sum(weights, pre_grads.view_as(pre_activations))  # [N, B, hidden]
        grad = torch.cat([torch.bmm(delta.transpose(1, 2), inputs).flatten(1), delta.sum(1),
                          _weighted_sum(weights, rest_grads.view_as(rest_points))], dim=1)
        return grad, losses.view(rest_points.shape[:2])


def _pair_gradients(module: nn.Module, points: Tensor, buffers: dict[str, Tensor], x: Tensor, y: Tensor,
                    logit_mask: Tensor | None, wrt_input: bool = False) -> tuple[Tensor | tuple[Tensor, Tensor], Tensor]:
    """Loss gradients of M (member, point) pairs in one ``vmap`` of ``grad_and_value``.

    Pair i runs ``module`` (part of the population's stacked network) with the flat parameters
    ``points[i]`` (``[M, P]``, one member's shapes) and buffers ``buffers[...][i]`` on its batch
    ``x[i]``, ``y[i]`` (``logit_mask[i]``); it returns the gradients ``[M, P]`` (with
    ``wrt_input``: the pair ``(d/dx [M, B, ...], d/dpoints [M, P])``) and the losses ``[M]``. Each
    pair's loss and gradient depend on that pair's tensors alone.
    """
    unflatten = _MemberUnflatten(module)

    def point_loss(inputs: Tensor, point: Tensor, pair_buffers: dict[str, Tensor], targets: Tensor,
                   mask: Tensor | None) -> Tensor:
        logits = functional_call(module, (unflatten(point), pair_buffers), (inputs,))
        return F.cross_entropy(mask_logits(logits, mask), targets)

    mask_dim = None if logit_mask is None else 0
    gradient = grad_and_value(point_loss, argnums=(0, 1) if wrt_input else 1)
    return vmap(gradient, in_dims=(0, 0, 0, 0, mask_dim))(x, points, buffers, y, logit_mask)


def _pairs(t: Tensor) -> Tensor:
    """``[N, K+1, ...]`` as ``[N * (K+1), ...]``: pair ``k * (K+1) + j`` is member k at point j."""
    return t.flatten(0, 1)


def _per_point(t: Tensor | None, points: int) -> Tensor | None:
    """Member k's ``t[k]`` once per point, ``[N * points, ...]`` in the order of :func:`_pairs`."""
    return None if t is None else t.repeat_interleave(points, dim=0)


def _buffer_clones(module: nn.Module, points: int) -> dict[str, Tensor]:
    """The stacked ``[N, ...]`` buffers of ``module``, once per point (``[N * points, ...]``, always
    copies), so in-place updates (running statistics) during the line search stay local."""
    return {name: b.repeat_interleave(points, dim=0) for name, b in module.named_buffers()}


class _MemberUnflatten:
    """Split one member's flat ``[P]`` vector into ``{name: view}`` in the stacked network's
    parameter order, with the member's shapes (the stacked ones without dim 0): the parameter
    dict ``torch.func.functional_call`` takes inside a vmap over members."""

    def __init__(self, module: nn.Module) -> None:
        named = list(module.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [p.shape[1:] for _, p in named]
        self.numels = [shape.numel() for shape in self.shapes]

    def __call__(self, flat: Tensor) -> dict[str, Tensor]:
        chunks = flat.split(self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}


def _weighted_sum(weights: Tensor, grads: Tensor) -> Tensor:
    """``sum_j weights[j] * grads[:, j]``: each member's combination of its K+1 point gradients."""
    return torch.einsum("j,nj...->n...", weights, grads)


