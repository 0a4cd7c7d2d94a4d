"""A population: N members of one network architecture, trained together as one stacked network.

Reproducing the MC-SGD paper (Mirzadeh et al., ICLR 2021) takes many runs of small networks, and
one run of the paper's MLP leaves an accelerator idle: each step is bound by Python and kernel
launches. A :class:`Population` holds N members with stacked parameters (shape ``[N, ...]``) and
runs them in one ``torch.func.vmap`` of ``torch.func.functional_call``, so N runs cost about one
step's launches.

Design principle: **a plain run is a population of one**. Member k depends only on its own seed
and settings, never on N or on the other members:

- Initial weights come from the member's seed alone (:func:`init_member`).
- The parameters are real ``nn.Parameter`` s of shape ``[N, ...]``. The loss to optimise is the
  *sum* of the members' losses, so the gradient of member k's slice is exactly member k's own
  gradient, and ``torch.optim.SGD`` (momentum, weight decay) is elementwise, hence per member.
- Dropout masks come from a counter-based hash of (member seed, dropout site, step, element),
  not from torch's global RNG (see :func:`~cl_lightning.models.member_random.keep_mask`).

Flat views (:meth:`Population.flat`, :meth:`Population.load_flat`) are ``[N, P]`` matrices whose
row k is member k's vector in the layout of ``parameters_to_vector(net.parameters())`` of a solo
network: the layout MC-SGD's solutions w_hat and w_bar are stored in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from cl_lightning.errors import CheckpointError
from cl_lightning.models.member_random import UNIFORM_BITS, drop_threshold, dropout_keys, keep_mask, keep_masks
from cl_lightning.models.nets import is_plain_mlp
from cl_lightning.seeding import generator

__all__ = ["Population", "fresh_copy", "init_member", "member_rows"]


def init_member(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """The network ``build()`` initialised from ``seed`` alone: a solo run's initial weights.

    ``build`` runs with torch's global CPU generator seeded from the keyed stream
    ``seeding.generator(seed, "init")`` (inside ``torch.random.fork_rng``, so the caller's RNG state
    is left as it was). The weights therefore depend on nothing but the seed and the architecture:
    not on what else the process drew before (data, other members), and not on the device the
    network is later moved to. (A run that builds its network right after ``seed_everything(seed)``
    instead, as LightningCLI does, starts from other weights for the same seed.)
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator(seed, "init").initial_seed())
        return build()


def fresh_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with newly drawn initial weights: every submodule's ``reset_parameters``,
    in module order, which is the order a network's constructor creates (and initialises) them, so
    ``init_member(lambda: fresh_copy(net), seed)`` is ``init_member(lambda: type(net)(...), seed)``
    for the networks here without knowing their constructor's arguments (the command line hands the
    module a built network)."""
    copy_ = copy.deepcopy(net)
    for module in copy_.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return copy_


def member_rows(saved: Sequence[int], seeds: Sequence[int], member: int | None = None) -> list[int]:
    """The rows (dim 0 of every stacked tensor) of a saved population whose members had the seeds
    ``saved`` that hold the members with ``seeds``: found by seed, or for one member by its place
    ``member`` (``model.population_member``, which a member's config.yaml holds; needed when its seed
    repeats in ``saved``).

    Raises:
        CheckpointError: ``member`` is not a member with that seed, or a seed repeats without it.
    """
    if member is not None and len(seeds) == 1:
        if member >= len(saved) or saved[member] != seeds[0]:
            raise CheckpointError(f"population_member {member} is not the member with seed {seeds[0]} of this checkpoint "
                                  f"(its seeds: {list(saved)}): use the member's own config.yaml with its population's checkpoint")
        return [member]
    repeated = sorted({seed for seed in seeds if list(saved).count(seed) > 1})
    if repeated:
        raise CheckpointError(
            f"the checkpoint's population holds seed {repeated[0]} more than once (members that differ in a setting), "
            "so a member cannot be picked out of it by its seed: use the member's own config.yaml (it names its "
            "place, model.population_member), or evaluate the whole population with its config.yaml")
    return [list(saved).index(seed) for seed in seeds]



class _CounterDropout(nn.Module):
    """``nn.Dropout`` of a population member, with :func:`keep_mask` masks.

    Its buffers hold one value per member in the population's stacked network, so one scalar per
    member inside the vmapped call: the member's ``key`` for this site and its drop ``threshold``
    (members may differ in dropout rate: it changes no shape). Both are integers, so ``.half()``
    or ``.double()`` on the population leaves them alone. ``step`` is shared by all members;
    :meth:`Population.forward` sets it.
    """

    def __init__(self, keys: Tensor, thresholds: Tensor) -> None:
        super().__init__()
        self.register_buffer("key", keys)
        self.register_buffer("threshold", thresholds)
        self.step = 0
        self._scales: tuple[tuple[int, int, torch.device, torch.dtype], Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """One member's forward (inside the population's ``vmap``: ``key`` and ``threshold`` are its scalars)."""
        return self._drop(x, self.key, self.threshold, x.shape)

    def apply_mask(self, x: Tensor, keep: Tensor) -> Tensor:
        """``x`` ``[N, ...]`` of every member at once, outside ``vmap`` (the batched-matmul MLP path), with
        the members' masks ``keep`` from :func:`keep_masks`: member k's rows get exactly what its vmapped
        forward would. The members' scales are computed once per threshold tensor and dtype, not per step."""
        cached = (id(self.threshold), self.threshold._version, self.threshold.device, x.dtype)
        if self._scales is None or self._scales[0] != cached:
            self._scales = (cached, self._scale(self.threshold, x.dtype))
        per_member = (x.shape[0], *([1] * (x.dim() - 1)))
        return x * (keep * self._scales[1].view(per_member))

    def _drop(self, x: Tensor, key: Tensor, threshold: Tensor, shape: Sequence[int]) -> Tensor:
        """``x`` with the :func:`keep_mask` of ``shape`` (one member's activation) applied and rescaled;
        ``key`` and ``threshold`` broadcast against the mask."""
        if not self.training:
            return x
        keep = keep_mask(key, self.step, shape, threshold)
        return x * (keep * self._scale(threshold, x.dtype))

    @staticmethod
    def _scale(threshold: Tensor, dtype: torch.dtype) -> Tensor:
        """1 / (1 - actual drop probability), exact in float64 before rounding to ``dtype``."""
        return (2.0**UNIFORM_BITS / (2**UNIFORM_BITS - threshold).to(torch.float64)).to(dtype)


class _StackedLinear(torch.autograd.Function):
    """``x @ weight^T + bias`` for every member at once (``x`` ``[N, B, in]``, ``weight`` ``[N, out, in]``,
    ``bias`` ``[N, out]``), with a backward that writes the weight's gradient in the weight's own layout.

    Why not autograd's ``baddbmm`` backward: for the transposed operand ``weight^T`` it returns
    ``x^T @ grad`` (``[N, in, out]``), whose transpose ``AccumulateGrad`` then copies into the
    parameter's contiguous ``[N, out, in]`` layout, and that strided copy costs about ten times the
    matmul itself on a CPU (the paper's MLP, N = 10, batch 10: 12.5 ms against 0.7 ms). Here the
    gradient is ``grad^T @ x``, the same products of the same numbers, already laid out as ``weight``.

    ``forward`` takes ``ctx`` itself rather than a separate ``setup_context``: with one, every ``apply`` binds
    its arguments through ``inspect.signature`` (about 0.1 ms on a CPU, three times a step). The layer runs
    outside ``torch.func`` transforms only (the vmapped members use ``nn.Linear``), which need ``setup_context``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


class Population(nn.Module):
    """N members of one architecture with stacked parameters, run as one vmapped network.

    ``forward`` maps inputs ``[N, B, ...]`` (member k's batch in row k) to logits ``[N, B, C]``.
    Train with the *sum* of the members' losses: each member then gets exactly its own gradient,
    and a standard ``torch.optim.SGD`` over :meth:`parameters` steps every member as its solo run.

    Members may differ in anything that changes no shape: weights, buffers, dropout rates. Every
    ``nn.Dropout`` of the networks is replaced by a counter-based dropout keyed by the member's
    seed (:func:`keep_mask`), so in training mode ``forward`` needs the ``step``.

    BatchNorm works under ``vmap`` in both of ``ResNet18``'s modes: with ``bn_stats="batch"``
    (no running statistics) each member normalises with its own batch; with ``"running"`` each
    member's running statistics are a slice of the stacked buffers and are updated in place.

    Args:
        nets: The members' networks, all of one architecture (same modules, parameter and buffer
            names and shapes). Build them with :func:`init_member` so member k's initial weights
            are those of the solo run with its seed (:meth:`from_seeds` does that). They are
            copied: the population does not share storage with them.
        seeds: The members' seeds, one per network; they key the dropout masks.
    """

    def __init__(self, nets: Sequence[nn.Module], seeds: Sequence[int]) -> None:
        super().__init__()
        if not nets or len(nets) != len(seeds):
            raise ValueError(f"need one seed per network and at least one network, got {len(nets)} nets and {len(seeds)} seeds")
        for k, net in enumerate(nets[1:], start=1):
            if _architecture(net) != _architecture(nets[0]):
                raise ValueError(f"member {k}'s network differs in architecture from member 0's")
        self.seeds = [int(s) for s in seeds]
        params, buffers = stack_module_state(list(nets))
        # The stacked network: a copy of member 0 whose parameters and buffers are replaced by the
        # stacked [N, ...] ones, in place, so their order (the flat layout) is the solo network's.
        self.stacked = copy.deepcopy(nets[0])
        for name, value in params.items():
            _set(self.stacked, name, nn.Parameter(value.detach()))
        for name, value in buffers.items():
            _set(self.stacked, name, value)
        # Site s is the s-th nn.Dropout in module order, whatever its rates. A site where every
        # member's rate is 0 is an identity (no hashing); any other random module makes vmap fail.
        # The paper's MLP (Linear, ReLU, dropout layers): batched matmuls instead of vmap.
        self._plain_mlp = is_plain_mlp(nets[0])
        self._dropout_sites: list[str] = []
        dropouts = [name for name, module in self.stacked.named_modules() if type(module) is nn.Dropout]
        for site, name in enumerate(dropouts):
            thresholds = torch.tensor([drop_threshold(net.get_submodule(name).p) for net in nets], dtype=torch.int64)
            if thresholds.any():
                _set(self.stacked, name, _CounterDropout(dropout_keys(self.seeds, site), thresholds))
                self._dropout_sites.append(name)
            else:
                _set(self.stacked, name, nn.Identity())

    @classmethod
    def from_seeds(cls, build: Callable[[], nn.Module], seeds: Sequence[int]) -> Population:
        """A population whose member k is ``build()`` initialised from ``seeds[k]`` (see
        :func:`init_member`)."""
        return cls([init_member(build, seed) for seed in seeds], seeds)

    @property
    def size(self) -> int:
        """N, the number of members."""
        return len(self.seeds)

    def has_active_dropout(self) -> bool:
        """Whether a forward draws dropout masks now: a dropout site (some member's rate above 0) in
        training mode."""
        return any(self.stacked.get_submodule(name).training for name in self._dropout_sites)

    def forward(self, x: Tensor, step: int | None = None) -> Tensor:
        """Logits ``[N, B, C]`` of the members on their inputs ``x`` of shape ``[N, B, ...]``.

        ``step`` keys the dropout masks; it is required in training mode when the networks have
        dropout (member k's masks depend only on its seed, the site and ``step``).
        """
        if x.shape[0] != self.size:
            raise ValueError(f"inputs must have shape [N={self.size}, B, ...], got {tuple(x.shape)}")
        if self.training and self._dropout_sites:
            if step is None:
                raise ValueError("a training-mode forward with dropout needs `step` (it keys the masks)")
            for name in self._dropout_sites:
                self.stacked.get_submodule(name).step = step
        if self._plain_mlp:
            return self._mlp_forward(x)
        params = dict(self.stacked.named_parameters())
        buffers = dict(self.stacked.named_buffers())
        return vmap(self._member_forward)(params, buffers, x)

    def _mlp_forward(self, x: Tensor) -> Tensor:
        """The paper's MLP for every member with one batched matmul per layer: the same function as
        the vmapped forward (member k's rows depend on member k's weights and masks only), with a
        fraction of its per-call overhead, which dominates small batches (``benchmarks/population.py``).
        The dropout masks of all sites are drawn in one pass (:func:`keep_masks`)."""
        h = x.flatten(2)
        masks = iter(self._mlp_masks(h.shape[1]))
        for layer in self.stacked.layers:
            if isinstance(layer, nn.Linear):
                h = _StackedLinear.apply(h, layer.weight, layer.bias)
            elif isinstance(layer, nn.ReLU):
                h = torch.relu(h)
            elif isinstance(layer, _CounterDropout) and layer.training:
                h = layer.apply_mask(h, next(masks))
        return h

    def _mlp_masks(self, batch_size: int) -> list[Tensor]:
        """The MLP's keep-masks for a batch of ``batch_size`` per member, one ``[N, B, width]`` per active
        dropout site in order (none in eval mode): a site's width is that of the Linear before it."""
        sites, widths, width = [], [], None
        for layer in self.stacked.layers:
            if isinstance(layer, nn.Linear):
                width = layer.out_features
            elif isinstance(layer, _CounterDropout) and layer.training:
                sites.append(layer)
                widths.append((batch_size, width))
        if not sites:
            return []
        keys, thresholds = torch.stack([s.key for s in sites]), torch.stack([s.threshold for s in sites])
        return keep_masks(keys, sites[0].step, widths, thresholds)

    def _member_forward(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.stacked, (params, buffers), (x,))

    @torch.no_grad()
    def flat(self) -> Tensor:
        """``[N, P]``: row k is member k's ``parameters_to_vector(net.parameters())`` (a copy)."""
        return torch.cat([p.reshape(self.size, -1) for p in self.stacked.parameters()], dim=1)

    @torch.no_grad()
    def load_flat(self, vectors: Tensor) -> None:
        """Copy ``[N, P]`` flat vectors (the layout of :meth:`flat`) into the members' parameters."""
        params = list(self.stacked.parameters())
        numel = sum(p[0].numel() for p in params)
        if vectors.shape != (self.size, numel):
            raise ValueError(f"vectors must have shape ({self.size}, {numel}), got {tuple(vectors.shape)}")
        offset = 0
        for p in params:
            width = p[0].numel()
            p.copy_(vectors[:, offset : offset + width].view_as(p))
            offset += width


def _architecture(net: nn.Module) -> tuple:
    """What must agree between members: module types and parameter/buffer names and shapes."""
    return (
        [(name, type(m)) for name, m in net.named_modules()],
        [(name, p.shape, p.dtype) for name, p in net.named_parameters()],
        [(name, b.shape, b.dtype) for name, b in net.named_buffers()],
    )


def _set(root: nn.Module, name: str, value: nn.Module | Tensor) -> None:
    """Replace the submodule, parameter or buffer at dotted ``name`` of ``root``, keeping its place
    in the registration order (and a buffer's persistence): ``nn.Module.__setattr__`` does both."""
    owner_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(owner_name), leaf, value)
