"""The shared plan and helpers of the BGN/GBGN engines: shapes, dtypes, layouts, running stats.

:class:`UnitsPlan` holds the shape arithmetic of the *units view* (runs of elements sharing one
channel and one group) that every engine shares; the functions here are what more than one
engine needs: the compute dtype (float32 statistics for half inputs), BatchNorm's running
statistics update, memory-format handling, fake-tensor and torch.func checks. No engine lives
here (see :mod:`bgnorm.ops.dispatch` for the engines and the choice between them).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

View = tuple[int, int, int, int]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32 for half types, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def in_functorch_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, vmap, ...) is active, outside
    torch.compile's tracing (which reports functorch's interpreter as active itself)."""
    return (not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is not None)


def update_running(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, batch_groups: int,
    count: int, momentum: float,
) -> None:
    """BatchNorm's running-statistics update from the batch statistics, in place.

    ``mean``/``var`` hold P0 * G biased statistics of ``count`` elements each (any shape); they
    are averaged over the P0 batch groups and the variance is stored unbiased
    (``count / (count - 1)``): ``running = (1 - momentum) * running + momentum * stat``.
    Call it without grad mode (the buffers are not differentiated).
    """
    if batch_groups > 1:
        mean = mean.reshape(batch_groups, -1).mean(0)
        var = var.reshape(batch_groups, -1).mean(0)
    # no view or cast op unless needed: each costs microseconds next to a (G,) lerp
    if mean.dim() != 1:
        mean, var = mean.reshape(-1), var.reshape(-1)
    if mean.dtype != running_mean.dtype:
        mean, var = mean.to(running_mean.dtype), var.to(running_var.dtype)
    running_mean.lerp_(mean, momentum)
    running_var.lerp_(var * (count / (count - 1)), momentum)


def _strides_like_channels_last(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """c10's rule for a 4D/5D tensor whose strides order its dimensions as channels-last does
    (C fastest, then the spatial axes from last to first, then N), ambiguous cases (C with
    stride 0, size-1 dimensions that order either way) counted as contiguous."""
    if strides[1] == 0:
        return False
    smallest = 0
    order = (1, 3, 2, 0) if len(sizes) == 4 else (1, 4, 3, 2, 0)
    for d in order:
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def memory_format_of(x: Tensor) -> torch.memory_format | None:
    """The memory format torch's norms give their output and input gradient for ``x`` when
    it is not contiguous: ``torch.channels_last`` (4D) or ``torch.channels_last_3d`` (5D) for
    inputs laid out so (torch's ``suggest_memory_format``), else None (contiguous). Also None
    under torch.func transforms, whose wrapped tensors run the plain composition (no
    autograd.Function keeps a format there)."""
    if x.dim() == 4:
        fmt = torch.channels_last
    elif x.dim() == 5:
        fmt = torch.channels_last_3d
    else:
        return None
    if x.is_contiguous() or in_functorch_transform():
        return None
    if x.is_contiguous(memory_format=fmt):
        return fmt
    return fmt if _strides_like_channels_last(tuple(x.shape), tuple(x.stride())) else None


class _ContiguousFor(torch.autograd.Function):
    """``x.contiguous()`` whose gradient goes back in ``memory_format``: the engines work on
    contiguous tensors, and the input gradient keeps the input's format as torch's norms."""

    @staticmethod
    def forward(ctx, x, memory_format):  # type: ignore[override]
        ctx.memory_format = memory_format
        return x.contiguous()

    @staticmethod
    def backward(ctx, dx):  # type: ignore[override]
        return dx.contiguous(memory_format=ctx.memory_format), None


def contiguous_for(x: Tensor, memory_format: torch.memory_format | None) -> Tensor:
    """``x.contiguous()`` for an engine; with autograd, ``x``'s gradient comes back in
    ``memory_format`` (x's, see :func:`memory_format_of`; None: as the engine gives it)."""
    if memory_format is None or not (x.requires_grad and torch.is_grad_enabled()):
        return x.contiguous()
    return _ContiguousFor.apply(x, memory_format)


def is_fake(t: Tensor) -> bool:
    """Whether ``t`` is a fake tensor (torch's FakeTensorMode: shapes without data, e.g. in
    memory estimators). Caches never keep one: a real call would get it back and return fakes."""
    return isinstance(t, FakeTensor)


def unit_length(channels: int, spatial: int, num_groups: int) -> int:
    """L = gcd(S, D/G): the longest run of elements sharing one channel and one group.

    Groups of whole channels give L = S and bands (k = G/C per channel) L = S/k, in forms
    that stay symbolic when torch.compile makes the spatial size dynamic (a new image size).
    Straddling groups (whose membership depends on the size) take the gcd of the concrete
    sizes: under dynamo this specializes the graph on S; symbolic sizes outside dynamo
    (which ``isinstance`` can tell apart) fall back to 1, every element its own unit.
    """
    if channels % num_groups == 0:
        return spatial
    if num_groups % channels == 0:
        return spatial // (num_groups // channels)
    if torch.compiler.is_compiling():
        return math.gcd(int(spatial), int(channels) * int(spatial) // int(num_groups))
    if not all(isinstance(v, int) for v in (channels, spatial, num_groups)):
        return 1
    return math.gcd(spatial, channels * spatial // num_groups)


class UnitsPlan:
    """The units view of one (N, C, S, G, P0) and the maps between its per-unit vectors and
    per-channel / per-group ones: the shape arithmetic both engines share.

    A *unit* is a run of L = gcd(S, D/G) consecutive elements of one example that lies in one
    channel and one group (U = D/L units per example): units are channels when G divides C,
    bands when C divides G, and finer pieces when groups straddle channels. Per unit, the
    statistics and the affine are constants, so every pass is a per-unit broadcast. ``rows`` is
    the number of per-unit coefficients a pass needs: U for BGN, N*U for GBGN (P0 > 1), whose
    batch groups have their own statistics.

    Build one with :func:`units_plan` (cached) for concrete sizes; the general engine builds its
    own under torch.compile, where sizes may be symbolic.
    """

    def __init__(self, n: int, c: int, s: int, g: int, p0: int, columns: bool = False) -> None:
        self.n, self.c, self.s, self.g, self.p0 = n, c, s, g, p0
        self.e = n // p0  # examples per batch group
        self.lg = c * s // g  # elements of one example in one group
        self.l = 1 if columns else unit_length(c, s, g)
        self.u = c * s // self.l
        self.upg = self.lg // self.l  # units per group
        self.upc = s // self.l  # units per channel
        self.count = self.e * self.lg  # elements per statistic
        self.rows = self.u if p0 == 1 else n * self.u
        self._indices: dict[tuple[str, torch.device], Tensor | None] = {}

    # --- broadcast views (no copies): the general engine, fused by inductor ------------------
    def per_unit(self, stat: Tensor) -> Tensor:
        """(P0, G) -> broadcastable (N or 1, U, 1) without copies."""
        p0, g, upg = self.p0, self.g, self.upg
        if p0 == 1:
            return stat.view(1, g, 1, 1).expand(1, g, upg, 1).reshape(1, self.u, 1)
        s = stat.view(p0, 1, g, 1, 1).expand(p0, self.e, g, upg, 1)
        return s.reshape(self.n, self.u, 1)

    def weight_per_unit(self, t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """(C,) -> (1, U)."""
        if t is None:
            return None
        return t.to(dtype).view(1, self.c, 1).expand(1, self.c, self.upc).reshape(1, self.u)

    def affine(self, rstd: Tensor, mean: Tensor, weight: Tensor | None, bias: Tensor | None,
               dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Per-unit scale and shift with y = x * scale + shift."""
        scale = self.per_unit(rstd)
        w_u = self.weight_per_unit(weight, dtype)
        if w_u is not None:
            scale = scale * w_u.unsqueeze(-1)
        shift = -self.per_unit(mean) * scale
        if bias is not None:
            shift = shift + self.weight_per_unit(bias, dtype).unsqueeze(-1)
        return scale, shift

    def to_channels(self, t: Tensor) -> Tensor:
        """Per-(n, unit) sums (N, U) -> per-channel sums (C,)."""
        return t.view(self.n, self.c, self.upc).sum(dim=(0, 2))

    # --- native kernels: the units view and contiguous per-unit coefficient rows -------------
    def view(self, t: Tensor) -> Tensor:
        """The units view of a contiguous tensor of N*D elements, laid out for native kernels
        whose "channels" are the coefficient rows: (N, U, L), (N, U) when L = 1 (their fast 2D
        layout), or (1, N*U, L) for GBGN."""
        if self.p0 == 1:
            return t.view(self.n, self.u) if self.l == 1 else t.view(self.n, self.u, self.l)
        return t.view(1, self.rows, self.l)

    def coef_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts one coefficient row against :meth:`view`."""
        return (1, self.rows) if (self.p0 == 1 and self.l == 1) else (1, self.rows, 1)

    def _make_index(self, kind: str, device: torch.device) -> Tensor:
        r = torch.arange(self.rows, device=device)
        unit = r % self.u
        if kind == "channel":
            return unit // self.upc
        idx = unit // self.upg
        if self.p0 > 1:
            idx = idx + (r // self.u // self.e) * self.g
        return idx

    def _index(self, kind: str, device: torch.device) -> Tensor | None:
        """(rows,) index from each coefficient row to its statistic (``"group"``) or channel
        (``"channel"``), cached per device; None where that map is the identity."""
        if self.p0 == 1 and (self.upg if kind == "group" else self.upc) == 1:
            return None
        if torch.compiler.is_compiling():
            return self._make_index(kind, device)
        key = (kind, device)
        idx = self._indices.get(key)
        if idx is None:
            with torch.inference_mode(False), torch.no_grad():
                idx = self._make_index(kind, device)
            if not is_fake(idx):  # made under FakeTensorMode: valid for that run only
                self._indices[key] = idx
        return idx

    def group_index(self, device: torch.device) -> Tensor | None:
        """(rows,) index from each coefficient row to its statistic; None for the identity."""
        return self._index("group", device)

    def channel_index(self, device: torch.device) -> Tensor | None:
        """(rows,) index from each coefficient row to its channel; None for the identity."""
        return self._index("channel", device)

    def groups_to_rows(self, t: Tensor) -> Tensor:
        """Per-statistic vectors (..., P0*G) -> per-row vectors (..., rows), one gather."""
        idx = self.group_index(t.device)
        return t if idx is None else t.index_select(-1, idx)

    def rows_to_channels(self, t: Tensor) -> Tensor:
        """Per-row sums (K, rows) -> per-channel sums (K, C)."""
        if self.p0 == 1 and self.upc == 1:
            return t
        return t.view(t.shape[0], -1, self.c, self.upc).sum(dim=(1, 3))

    def rows_to_groups(self, t: Tensor) -> Tensor:
        """Per-row sums (K, rows) -> per-statistic sums (K, P0*G)."""
        k = t.shape[0]
        if self.p0 == 1 and self.upg == 1:
            return t
        return t.view(k, self.p0, -1, self.g, self.upg).sum(dim=(2, 4)).view(k, -1)


@functools.lru_cache(maxsize=1024)
def units_plan(n: int, c: int, s: int, g: int, p0: int, columns: bool = False) -> UnitsPlan:
    """The cached :class:`UnitsPlan` of concrete sizes (eager mode)."""
    return UnitsPlan(n, c, s, g, p0, columns)
