"""MC-SGD's line gradient: loss gradients at evenly spaced points of a segment in weight space.

MC-SGD (Mirzadeh et al., ICLR 2021) consolidates a task by moving the kept weights ``w`` so
that the loss stays low along the segments from earlier solutions ``s`` to ``w``. Its research
code (``imirzadeh/CL-LinearModeConnectivity``, ``core/mode_connectivity.py:get_line_loss``)
evaluates the network at the K+1 points

    theta_j = s + alpha_j * (w - s),   alpha_j = j / K,   j = 0..K   (both ends included)

and applies the loss gradient *taken at each point* (no chain-rule factor alpha_j) to ``w``.
:class:`LineGradient` computes that update direction, either with the research code's
weighting or with a clean uniform mean; see :class:`LineGradient` for the formulas.

Everything works on flat parameter vectors in the layout of
``torch.nn.utils.parameters_to_vector(net.parameters())``, which is how MC-SGD stores its
solutions.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from cl_lightning.errors import ConfigError
from cl_lightning.models.module import mask_logits
from cl_lightning.models.nets import MLP
from cl_lightning.models.params import Unflatten, outside_inference

__all__ = ["LineGradient"]

Weighting = Literal["reference", "uniform"]
Backend = Literal["auto", "vmap", "loop", "affine"]



class LineGradient:
    """Combined loss gradient at the K+1 points of a segment, as MC-SGD's consolidation uses it.

    With ``alpha_j = j / K`` and ``theta_j = start + alpha_j * (end - start)``:

    - ``weighting="reference"`` reproduces the research code, which never zeroed ``.grad``
      between points, summed the running sums, and divided each batch-mean cross-entropy once
      more by the batch size ``B``:
      ``g = sum_j (K + 1 - j) * grad CE(theta_j) / B`` (weights 6, 5, 4, 3, 2, 1 for K = 5,
      largest at ``start``). Use it to reproduce the paper's numbers and learning rates.
    - ``weighting="uniform"`` is the clean alternative, the mean of the point gradients:
      ``g = 1 / (K + 1) * sum_j grad CE(theta_j)``. It needs different learning rates.

    In both, each gradient is taken with respect to the point's own parameters, then applied
    as is: this is not ``d/d end`` of a line loss, which would carry an extra factor
    ``alpha_j``.

    Backends (all give the same result up to float rounding):

    - ``"vmap"``: one batched ``torch.func.vmap(grad(...))`` over the stacked points; needs a
      network that ``vmap`` can batch.
    - ``"loop"``: K+1 sequential ``torch.autograd.grad`` calls; works for any module.
    - ``"affine"``: only for :class:`~cl_lightning.models.nets.MLP`. The first layer's
      pre-activation is affine in alpha, ``x W_s^T + b_s + alpha_j (x D^T + d_b)``, so it
      costs 2 matmuls instead of K+1 (plus one for its summed weight gradient); the rest of
      the network is vmapped. That layer holds most of an MNIST MLP's FLOPs.
    - ``"auto"``: ``"affine"`` for an ``MLP``; otherwise ``"loop"`` on CPU and ``"vmap"`` on
      other devices. On CPU ``vmap`` turns the per-point convolutions of ``ResNet18`` into
      grouped convolutions, measured 1.4x (batch 5) to 5x (batch 64) *slower* than the loop;
      on GPUs batching removes K+1 rounds of kernel launches, which is where it should pay.

    Modes are the caller's business: put the network in ``eval()`` mode first, as MC-SGD does
    (dropout off). The ``vmap`` and ``affine`` backends refuse an active dropout (``vmap``
    forbids random operations), and under ``vmap`` a training-mode BatchNorm that tracks running
    statistics fails because it cannot update them. ``ResNet18``'s BatchNorm has no running
    statistics, so each point is normalised with its own batch statistics in either mode,
    as in the research code.

    The network itself is never modified: parameters come from ``start``/``end`` through
    ``torch.func.functional_call``, and buffers are passed as clones. Calls work inside
    Lightning hooks (grad mode is forced on, inference mode off) and on whatever device the
    inputs live on (the network must be on that device too).

    Args:
        net: The network whose parameters the flat vectors describe. It must return logits.
        num_segments: K, the number of segments; the gradient is taken at K+1 points.
        weighting: ``"reference"`` (research code) or ``"uniform"`` (mean over points).
        backend: ``"auto"``, ``"vmap"``, ``"loop"`` or ``"affine"`` (see above).
    """

    def __init__(
        self,
        net: nn.Module,
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
        if backend == "affine" and not _is_plain_mlp(net):
            raise ConfigError(
                f"backend 'affine' needs a cl_lightning.models.nets.MLP, got {type(net).__name__}"
            )
        self.net = net
        self.num_segments = num_segments
        self.weighting: Weighting = weighting
        self.backend: Backend = backend

    def resolve_backend(self, device: torch.device) -> Literal["vmap", "loop", "affine"]:
        """The backend a call on ``device`` uses: ``backend`` itself unless it is ``"auto"``."""
        if self.backend != "auto":
            return self.backend
        if _is_plain_mlp(self.net):
            return "affine"
        return "loop" if device.type == "cpu" else "vmap"

    def point_weights(self, batch_size: int, share: float = 1.0) -> Tensor:
        """The factor ``c_j`` multiplying each point's batch-mean gradient, shape ``(K+1,)``.

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
        """Compute the line gradient on one batch.

        Args:
            start: Flat parameter vector of the segment's fixed end ``s`` (``alpha = 0``).
            end: Flat parameter vector ``w`` being optimised (``alpha = 1``).
            x: Input batch.
            y: Integer class targets, shape ``(N,)``.
            logit_mask: Optional bool mask of shape ``(num_classes,)`` or ``(N, num_classes)``;
                logits where it is False are set to ``MASKED_LOGIT`` before the
                cross-entropy (split CIFAR task masking), so they get no gradient.
            share: This batch's share ``B / N`` of the ``N`` examples one optimizer step's loss
                is taken over, when the step spans several batches of a line; the gradient is
                multiplied by it. With ``weighting="reference"`` it turns the research code's
                division by the batch size ``B`` into a division by ``N``: its full-batch
                consolidation (CL-LinearModeConnectivity 177f216, ``get_clf_loss``) divided the
                sum of the batch-mean losses by the line's number of examples. With
                ``"uniform"``, summing over the batches gives the mean over the ``N`` examples.
                1 (the default) is a step on this batch alone.

        Returns:
            The combined gradient (flat, shape and dtype of ``start``, to be applied to
            ``end``) and the batch-mean cross-entropy at each point, shape ``(K+1,)``,
            detached.
        """
        num_params = sum(p.numel() for p in self.net.parameters())
        if start.shape != (num_params,) or end.shape != (num_params,):
            raise ValueError(
                f"start and end must be flat vectors of the network's {num_params} parameters, "
                f"got shapes {tuple(start.shape)} and {tuple(end.shape)}"
            )
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if logit_mask is not None and (
            logit_mask.dtype != torch.bool
            or logit_mask.dim() not in (1, 2)
            or (logit_mask.dim() == 2 and logit_mask.shape[0] != x.shape[0])
        ):
            raise ValueError(
                "logit_mask must be a bool tensor of shape (num_classes,) or (N, num_classes), "
                f"got {logit_mask.dtype} of shape {tuple(logit_mask.shape)}"
            )
        with torch.inference_mode(False), torch.enable_grad():
            # Tensors made under inference mode cannot be saved for backward; clones can.
            start, end, x, y = (outside_inference(t.detach()) for t in (start, end, x, y))
            if logit_mask is not None:
                logit_mask = outside_inference(logit_mask)
            alphas = torch.arange(self.num_segments + 1, device=start.device, dtype=start.dtype)
            alphas = alphas / self.num_segments
            weights = self.point_weights(x.shape[0], share).to(device=start.device, dtype=start.dtype)
            backend = self.resolve_backend(start.device)
            if backend != "loop" and _has_active_dropout(self.net):
                raise RuntimeError(
                    f"backend {backend!r} cannot run dropout (vmap forbids random operations): "
                    "put the network in eval() mode first, as MC-SGD does, or use backend 'loop'"
                )
            compute = {"vmap": self._vmap, "loop": self._loop, "affine": self._affine}[backend]
            grad, losses = compute(start, end, alphas, weights, x, y, logit_mask)
        return grad, losses.detach()

    def _vmap(
        self,
        start: Tensor,
        end: Tensor,
        alphas: Tensor,
        weights: Tensor,
        x: Tensor,
        y: Tensor,
        logit_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        unflatten = Unflatten(self.net)
        buffers = _buffer_clones(self.net)

        def point_loss(point: Tensor) -> Tensor:
            logits = functional_call(self.net, (unflatten(point), buffers), (x,))
            return _masked_cross_entropy(logits, y, logit_mask)

        points = torch.lerp(start, end, alphas[:, None])  # lerp is exact at both ends
        grads, losses = vmap(grad_and_value(point_loss))(points)
        return weights @ grads, losses

    def _loop(
        self,
        start: Tensor,
        end: Tensor,
        alphas: Tensor,
        weights: Tensor,
        x: Tensor,
        y: Tensor,
        logit_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        unflatten = Unflatten(self.net)
        buffers = _buffer_clones(self.net)
        total = torch.zeros_like(start)
        losses = []
        for alpha, weight in zip(alphas, weights):
            point = torch.lerp(start, end, alpha).requires_grad_()
            logits = functional_call(self.net, (unflatten(point), buffers), (x,))
            loss = _masked_cross_entropy(logits, y, logit_mask)
            (grad,) = torch.autograd.grad(loss, point)
            total += weight * grad
            losses.append(loss.detach())
        return total, torch.stack(losses)

    def _affine(
        self,
        start: Tensor,
        end: Tensor,
        alphas: Tensor,
        weights: Tensor,
        x: Tensor,
        y: Tensor,
        logit_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        first: nn.Linear = self.net.layers[0]
        rest: nn.Sequential = self.net.layers[1:]  # shares the modules; keys stay "1", "2", ...
        unflatten_rest = Unflatten(rest)
        buffers = _buffer_clones(rest)
        first_sizes = [first.weight.numel(), first.bias.numel()]
        sizes = [*first_sizes, start.numel() - sum(first_sizes)]
        w_start, b_start, rest_start = start.split(sizes)
        w_end, b_end, rest_end = end.split(sizes)

        inputs = x.flatten(1)  # as MLP.forward does
        base = F.linear(inputs, w_start.view_as(first.weight), b_start)
        direction = F.linear(inputs, (w_end - w_start).view_as(first.weight), b_end - b_start)
        pre_activations = base + alphas[:, None, None] * direction  # (K+1, N, hidden)
        rest_points = torch.lerp(rest_start, rest_end, alphas[:, None])

        def point_loss(pre_activation: Tensor, rest_point: Tensor) -> Tensor:
            logits = functional_call(rest, (unflatten_rest(rest_point), buffers), (pre_activation,))
            return _masked_cross_entropy(logits, y, logit_mask)

        (pre_grads, rest_grads), losses = vmap(grad_and_value(point_loss, argnums=(0, 1)))(
            pre_activations, rest_points
        )
        # sum_j c_j * (delta_j^T x) = (sum_j c_j delta_j)^T x: one matmul for the first layer.
        delta = torch.tensordot(weights, pre_grads, dims=1)  # (N, hidden)
        grad = torch.cat([(delta.T @ inputs).flatten(), delta.sum(0), weights @ rest_grads])
        return grad, losses


def _is_plain_mlp(net: nn.Module) -> bool:
    """Whether ``net`` is an ``MLP`` running ``MLP.forward``, which the affine path assumes."""
    return isinstance(net, MLP) and type(net).forward is MLP.forward


def _has_active_dropout(net: nn.Module) -> bool:
    dropouts = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    return any(isinstance(m, dropouts) and m.training and m.p > 0 for m in net.modules())


def _buffer_clones(module: nn.Module) -> dict[str, Tensor]:
    """Clones of the module's buffers, so in-place updates during the line search stay local."""
    return {name: b.clone() for name, b in module.named_buffers()}


def _masked_cross_entropy(logits: Tensor, y: Tensor, logit_mask: Tensor | None) -> Tensor:
    return F.cross_entropy(mask_logits(logits, logit_mask), y)
