"""PyTorch's generic module checks for BatchGroupNorm1d/2d/3d, on torch's own BatchNorm inputs.

The checks are those of pytorch's ``test/test_modules.py`` (TestModule): forward against a
reference, repr, pickle, non-contiguous inputs, memory formats, factory kwargs (and the meta
device), errors, gradcheck and gradgradcheck, and on CUDA the CPU/GPU parity and device
transfers; plus state-dict round trips, in-place use of the output and empty batches. The
module inputs are torch's for BatchNorm1d/2d/3d (``module_inputs_torch_nn_BatchNorm1d`` ... and
``module_error_inputs_torch_nn_BatchNorm1d_2d_3d`` in ``torch.testing._internal.common_modules``,
torch 2.13): the same constructor arguments and input shapes, each instantiated at
num_groups G = C, 1, 2 and 2C, plus a few inputs of ours (EXTRA_INPUTS). A G that does not
divide D = C * prod(spatial) of an entry's input is skipped with the reason (test_errors checks
that such a G is refused).

torch's BatchNorm itself runs every generic check as the control: a check that torch's own layer
fails is a wrong check. Its reference is the same equations at G = C.

Each check is one parametrized test over ENTRIES (and train/eval where the forward matters).
The reference's gradcheck runs in fast mode with batched gradients (``common_utils.gradcheck``);
the full Jacobians (``PYTORCH_TEST_WITH_SLOW_GRADCHECK``) are the slow variants.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
from dataclasses import dataclass
from itertools import product
from typing import Any

import pytest
import torch
from reference import ENGINES, bgn_eval_ref, bgn_ref, set_engine
from torch import nn
from torch.testing import assert_close

from bgnorm import BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d

F64 = torch.float64

BGN = {1: BatchGroupNorm1d, 2: BatchGroupNorm2d, 3: BatchGroupNorm3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

# ---- the module inputs ---------------------------------------------------------------------

#: torch's BatchNorm module inputs (common_modules.py, torch 2.13) as (desc, C, constructor
#: keyword arguments, input shape); torch's positional arguments after C (eps, momentum, affine,
#: track_running_stats) are named, since ours take num_groups second.
TORCH_INPUTS: dict[int, list[tuple[str, int, dict[str, Any], tuple[int, ...]]]] = {
    1: [
        ("affine", 10, {}, (4, 10)),
        ("3d_input", 5, {}, (4, 5, 3)),
        ("affine_simple_average", 10, {"eps": 1e-3, "momentum": None}, (4, 10)),
        ("not_affine", 10, {"eps": 1e-3, "momentum": 0.3, "affine": False}, (4, 10)),
        ("not_tracking_stats", 10,
         {"eps": 1e-3, "momentum": 0.3, "affine": True, "track_running_stats": False}, (4, 10)),
        ("3d_input_not_affine", 5, {"eps": 1e-3, "momentum": 0.3, "affine": False}, (4, 5, 3)),
        ("zero_batch", 5, {"eps": 1e-3, "momentum": 0.3, "affine": False}, (0, 5, 9)),
        ("affine_not_bias", 10, {"bias": False}, (4, 10)),
    ],
    2: [
        ("default", 3, {}, (2, 3, 6, 6)),
        ("2d_simple_average", 3, {"eps": 1e-3, "momentum": None}, (2, 3, 6, 6)),
        ("momentum", 3, {"eps": 1e-3, "momentum": 0.8}, (2, 3, 6, 6)),
        ("not_affine", 3, {"eps": 1e-3, "momentum": 0.8, "affine": False}, (2, 3, 6, 6)),
        ("not_tracking_stats", 3,
         {"eps": 1e-3, "momentum": 0.8, "affine": True, "track_running_stats": False},
         (2, 3, 6, 6)),
        ("zero_batch", 5, {"eps": 1e-3, "momentum": 0.3, "affine": False}, (0, 5, 2, 2)),
        ("affine_not_bias", 3, {"bias": False}, (2, 3, 6, 6)),
    ],
    3: [
        ("default", 3, {}, (2, 3, 4, 4, 4)),
        ("3d_simple_average", 3, {"eps": 1e-3, "momentum": None}, (2, 3, 4, 4, 4)),
        ("momentum", 3, {"eps": 1e-3, "momentum": 0.7}, (2, 3, 4, 4, 4)),
        ("not_affine", 3, {"eps": 1e-3, "momentum": 0.7, "affine": False}, (2, 3, 4, 4, 4)),
        ("not_tracking_stats", 3,
         {"eps": 1e-3, "momentum": 0.7, "affine": True, "track_running_stats": False},
         (2, 3, 4, 4, 4)),
        ("zero_batch", 5, {"eps": 1e-3, "momentum": 0.3, "affine": False}, (0, 5, 2, 2, 2)),
        ("affine_not_bias", 3, {"bias": False}, (2, 3, 4, 4, 4)),
    ],
}

#: Inputs of ours on top of torch's: a 1d length where G = 2 straddles channels and G = 2C makes
#: bands (torch's lengths 1, 3 and 9 admit neither with C = 5 or 10); empty batches with affine
#: parameters, with and without bias (torch's empty batch has none, so no parameter gradients);
#: an empty spatial size.
EXTRA_INPUTS: dict[int, list[tuple[str, int, dict[str, Any], tuple[int, ...]]]] = {
    1: [
        ("3d_input_even_length", 5, {}, (4, 5, 4)),
        ("zero_batch_affine", 5, {}, (0, 5, 4)),
    ],
    2: [
        ("zero_batch_affine", 5, {}, (0, 5, 2, 2)),
        ("zero_batch_not_bias", 5, {"bias": False}, (0, 5, 2, 2)),
        ("zero_spatial", 5, {"momentum": None}, (2, 5, 0, 3)),
    ],
    3: [
        ("zero_batch_affine", 5, {}, (0, 5, 2, 2, 2)),
    ],
}

GROUPS = ("C", "1", "2", "2C")  # the G of every entry, as multiples of C or constants


@dataclass(frozen=True)
class Entry:
    """One module input: a layer class of ``dims`` (1d/2d/3d), its constructor arguments and
    the input shape. ``groups`` is G for BatchGroupNorm, None for torch's BatchNorm (the
    control, whose statistics are those of G = C)."""

    dims: int
    desc: str
    num_features: int
    kwargs: tuple[tuple[str, Any], ...]
    shape: tuple[int, ...]
    groups: int | None

    @property
    def cls(self) -> type[nn.Module]:
        return BN[self.dims] if self.groups is None else BGN[self.dims]

    @property
    def G(self) -> int:
        return self.num_features if self.groups is None else self.groups

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.kwargs)

    @property
    def tracking(self) -> bool:
        return self.options.get("track_running_stats", True)

    @property
    def empty(self) -> bool:
        return math.prod(self.shape) == 0

    def make(self, **factory: Any) -> nn.Module:
        """The layer of this entry (``factory``: device and dtype)."""
        if self.groups is None:
            return self.cls(self.num_features, **self.options, **factory)
        return self.cls(self.num_features, self.groups, **self.options, **factory)

    def counterpart(self) -> nn.Module:
        """The same configuration on the other side: torch's BatchNorm for ours, ours at G = C
        for torch's."""
        if self.groups is None:
            return BGN[self.dims](self.num_features, self.num_features, **self.options)
        return BN[self.dims](self.num_features, **self.options)

    def input(self, dtype: torch.dtype = F64, requires_grad: bool = False) -> torch.Tensor:
        x = (torch.randn(self.shape, dtype=F64) * 2 + 0.5).to(dtype)
        return x.requires_grad_(requires_grad)

    @property
    def id(self) -> str:
        g = "" if self.groups is None else f"-G={self.groups}"
        return f"{self.cls.__name__}-{self.desc}{g}"


def _skip_reason(c: int, g: int, shape: tuple[int, ...]) -> str | None:
    d = c * math.prod(shape[2:])
    if d % g != 0:
        spatial = math.prod(shape[2:])
        why = (f" (G = {g // c}C cuts each channel into {g // c} bands of its spatial size "
               f"{spatial})" if g % c == 0 else "")
        return (f"G={g} does not divide D = {d} of input {shape}{why}; the layer refuses it "
                "(test_errors: groups_not_dividing_D)")
    return None


def _entries() -> list[Any]:
    params = []
    for dims in (1, 2, 3):
        for desc, c, kwargs, shape in TORCH_INPUTS[dims] + EXTRA_INPUTS[dims]:
            frozen = tuple(sorted(kwargs.items()))
            control = Entry(dims, desc, c, frozen, shape, None)
            params.append(pytest.param(control, id=control.id))
            for name in GROUPS:
                g = {"C": c, "1": 1, "2": 2, "2C": 2 * c}[name]
                entry = Entry(dims, desc, c, frozen, shape, g)
                reason = _skip_reason(c, g, shape)
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                params.append(pytest.param(entry, id=f"{entry.cls.__name__}-{desc}-G={name}",
                                           marks=marks))
    return params


ENTRIES = _entries()


def _select(keep) -> list[Any]:
    return [p for p in ENTRIES if keep(p.values[0])]


MODES = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


def _engine_entries(full: bool = False) -> list[Any]:
    """(entry, engine[, fast_mode]) for the checks that run the training engines: every entry on
    "auto" (what a user gets: at these sizes the few-calls batch-norm engine, the units engine
    for straddling groups) and, in the slow suite, each of ours (non-empty: an empty input
    takes no engine) on each engine and layout of tests/reference.py forced (what larger
    inputs, other layouts and torch.compile take). ``full``: gradient checks, whose fast mode
    runs everywhere and full Jacobians on "auto" in the slow suite."""
    out = []
    for p in ENTRIES:
        entry = p.values[0]
        runs = [("auto", True, p.marks)]
        if full:
            runs.append(("auto", False, [*p.marks, pytest.mark.slow]))
        if entry.groups is not None and not entry.empty and not p.marks:
            runs += [(e, True, [pytest.mark.slow]) for e in ENGINES]
        for engine, fast, marks in runs:
            if full:
                out.append(pytest.param(entry, engine, fast, marks=marks,
                                        id=f"{p.id}-{engine}-{'fast' if fast else 'full'}"))
            else:
                out.append(pytest.param(entry, engine, marks=marks, id=f"{p.id}-{engine}"))
    return out


ENGINE_ENTRIES = pytest.mark.parametrize("entry,engine", _engine_entries())
GRADIENT_ENTRIES = pytest.mark.parametrize("entry,engine,fast_mode", _engine_entries(True))


def _use_engine(name: str, request) -> None:
    if name != "auto":
        set_engine(request, name)


# ---- helpers --------------------------------------------------------------------------------


def _build(entry: Entry, training: bool, dtype: torch.dtype = F64) -> nn.Module:
    """The entry's layer in ``dtype`` with random affine parameters and running statistics (so
    that each of them matters) and 3 batches tracked (a cumulative average then weighs the next
    batch by 1/4), in train or eval mode."""
    m = entry.make(dtype=dtype)
    with torch.no_grad():
        if m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
        if m.bias is not None:
            m.bias.uniform_(-1, 1)
        if m.running_mean is not None:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(3)
    return m.train(training)


def _params(m: nn.Module) -> tuple[torch.Tensor, ...]:
    return tuple(m.parameters())


def _reference(m: nn.Module, x: torch.Tensor, groups: int):
    """(output, running_mean, running_var) that ``m(x)`` must give, from the equations in
    float64 (tests/reference.py) and torch's running-average rule; call it before ``m(x)``,
    which updates the statistics."""
    x = x.detach().double()
    w = None if m.weight is None else m.weight.detach().double()
    b = None if m.bias is None else m.bias.detach().double()
    rm = None if m.running_mean is None else m.running_mean.detach().double()
    rv = None if m.running_var is None else m.running_var.detach().double()
    if x.numel() == 0:  # an empty output; the statistics are left alone (torch's BatchNorm)
        return x.clone(), rm, rv
    if not m.training and rm is not None:
        return bgn_eval_ref(x, groups, rm, rv, w, b, m.eps), rm, rv
    y, mean, var = bgn_ref(x, groups, w, b, m.eps)
    if not m.training or rm is None:
        return y, rm, rv
    count = x.numel() // groups  # N * D / G values per group
    factor = m.momentum if m.momentum is not None else 1 / (int(m.num_batches_tracked) + 1)
    rm = (1 - factor) * rm + factor * mean
    rv = (1 - factor) * rv + factor * var * count / (count - 1)
    return y, rm, rv


def _state(m: nn.Module) -> dict[str, Any]:
    """Every parameter and buffer (cloned) and the group layout, to compare two layers."""
    state = {k: v.detach().clone() for k, v in m.state_dict().items() if torch.is_tensor(v)}
    state["layout_shape"] = getattr(m, "layout_shape", None)
    return state


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        if torch.is_tensor(sa[key]):
            assert sa[key].dtype == sb[key].dtype, key
            assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)
        else:
            assert sa[key] == sb[key], key


def _grads(y: torch.Tensor, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor):
    return torch.autograd.grad(y, inputs, grad, allow_unused=False)


def _formats(dim: int) -> list[torch.memory_format]:
    return [torch.contiguous_format] + (
        [torch.channels_last] if dim == 4 else [torch.channels_last_3d] if dim == 5 else [])


def _has_format(t: torch.Tensor, fmt: torch.memory_format) -> bool:
    return t.is_contiguous(memory_format=fmt)


# ---- forward (test_forward) -----------------------------------------------------------------


@MODES
@ENGINE_ENTRIES
def test_forward(entry: Entry, engine: str, training: bool, request):
    """The output and the running statistics are the equations' in float64, in train and eval
    (eval without running statistics: batch statistics); the dtype methods then convert every
    parameter and buffer and the layer runs in the new dtype (torch's test_forward)."""
    _use_engine(engine, request)
    m = _build(entry, training)
    x = entry.input()
    y_ref, rm_ref, rv_ref = _reference(m, x, entry.G)
    tracked = None if m.num_batches_tracked is None else int(m.num_batches_tracked)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y_ref)
    if entry.tracking:
        assert_close(m.running_mean, rm_ref)
        assert_close(m.running_var, rv_ref)
        assert int(m.num_batches_tracked) == tracked + training
    else:
        assert m.running_mean is None and m.running_var is None and m.num_batches_tracked is None

    m.float()
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        assert t.dtype == (torch.long if name == "num_batches_tracked" else torch.float32), name
    x32 = x.float()
    y_ref, rm_ref, rv_ref = _reference(m, x32, entry.G)
    y32 = m(x32)
    assert y32.dtype == torch.float32
    assert_close(y32, y_ref.float(), rtol=1e-4, atol=1e-4)
    if entry.tracking:
        assert_close(m.running_mean, rm_ref.float(), rtol=1e-4, atol=1e-4)
        assert_close(m.running_var, rv_ref.float(), rtol=1e-4, atol=1e-4)

    m.double()  # and back: float64 buffers and parameters, float64 output
    assert all(p.dtype == F64 for p in m.parameters())
    assert m(x).dtype == F64


@pytest.mark.parametrize("swap", [False, True], ids=["assign", "swap"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_to(entry: Entry, swap: bool):
    """``to(dtype)`` after a forward converts every parameter and buffer, by assignment or by
    swapping the tensors in place (``torch.__future__.set_swap_module_params_on_conversion``,
    which keeps the Parameter objects), and the layer then computes in the new dtype; the
    parameters still collect gradients (torch's test_to)."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        m = _build(entry, True, torch.float32)
        m(entry.input(torch.float32))
        ids = [id(p) for p in m.parameters()]
        m.to(F64)
        assert all(isinstance(p, nn.Parameter) and p.dtype == F64 for p in m.parameters())
        if swap:
            assert [id(p) for p in m.parameters()] == ids
        x = entry.input(requires_grad=True)
        y_ref, _, _ = _reference(m, x, entry.G)
        y = m(x)
        assert_close(y, y_ref)
        y.sum().backward()
        assert all(p.grad is not None and p.grad.dtype == F64 for p in m.parameters())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


# ---- repr (test_repr) -----------------------------------------------------------------------


def _config(m: nn.Module) -> dict[str, Any]:
    return {
        "type": type(m), "num_features": m.num_features,
        "num_groups": getattr(m, "num_groups", None), "eps": m.eps, "momentum": m.momentum,
        "affine": m.affine, "track_running_stats": m.track_running_stats,
        "weight": m.weight is not None, "bias": m.bias is not None,
        "shapes": {k: tuple(v.shape) for k, v in m.state_dict().items() if torch.is_tensor(v)},
    }


@pytest.mark.parametrize("entry", ENTRIES)
def test_repr(entry: Entry):
    """repr and str work and are the constructor call: evaluated, it builds the same layer."""
    m = entry.make()
    text = repr(m)
    assert str(m) == text == f"{type(m).__name__}({m.extra_repr()})"
    rebuilt = eval(text, {type(m).__name__: type(m)})
    assert repr(rebuilt) == text
    assert _config(rebuilt) == _config(m)
    if entry.groups is not None:
        assert f"num_groups={entry.groups}," in text
    if m.affine:  # the repr says whether the layer has beta (without affine, neither has)
        assert ("bias=False" in text) == (entry.options.get("bias") is False) == (m.bias is None)


# ---- pickle and deepcopy (test_pickle) ------------------------------------------------------


def _torch_save_load(m: nn.Module) -> nn.Module:
    with io.BytesIO() as f:
        torch.save(m, f)
        f.seek(0)
        return torch.load(f, weights_only=False)


@MODES
@ENGINE_ENTRIES
def test_pickle_and_deepcopy(entry: Entry, engine: str, training: bool, request):
    """A pickled (torch.save, pickle) or deep-copied layer, taken after a forward (statistics
    updated, a straddling layout recorded, the eval pass kept), has the same state and gives
    the same output and state on the next call."""
    _use_engine(engine, request)
    m = _build(entry, training)
    x = entry.input()
    m(x)
    copies = {"torch.save": _torch_save_load(m), "pickle": pickle.loads(pickle.dumps(m)),
              "deepcopy": copy.deepcopy(m)}
    y = m(x)
    for how, c in copies.items():
        assert type(c) is type(m) and c.training == training, how
        assert c(x).equal(y), how
        _assert_same_state(c, m)


# ---- non-contiguous inputs (test_non_contiguous_tensors) ------------------------------------


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The reference's non-contiguous copy: every other element of a doubled last dimension."""
    return torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values stored channel-major (batch and channel axes swapped in memory)."""
    return t.detach().transpose(0, 1).contiguous().transpose(0, 1)


@MODES
@ENGINE_ENTRIES
def test_non_contiguous_tensors(entry: Entry, engine: str, training: bool, request):
    """Non-contiguous inputs and output gradients (strided views, batch/channel-transposed
    storage), in every combination, give the outputs and the input and parameter gradients of
    the contiguous ones."""
    _use_engine(engine, request)
    m = _build(entry, training)
    x = entry.input(requires_grad=True)
    params = _params(m)
    y = m(x)
    grad = torch.randn_like(y)
    expected = _grads(y, (x, *params), grad)
    for make in (_strided, _transposed):
        xn, gn = make(x).requires_grad_(), make(grad)
        if not entry.empty and make is _strided:
            assert not xn.is_contiguous() and not gn.is_contiguous()
        for xi, gi in product((x, xn), (grad, gn)):
            yi = m(xi)
            assert_close(yi, y)
            assert_close(_grads(yi, (xi, *params), gi), expected)


# ---- memory formats (test_memory_format) ----------------------------------------------------


@MODES
@ENGINE_ENTRIES
def test_memory_format(entry: Entry, engine: str, training: bool, request):
    """channels_last (4D) and channels_last_3d (5D) inputs, with the layer converted to each
    memory format, give the contiguous output and gradients, and the output and the input
    gradient keep the input's memory format (contiguous inputs give contiguous ones)."""
    _use_engine(engine, request)
    m = _build(entry, training)
    x = entry.input(requires_grad=True)
    params = _params(m)
    y_ref = m(x)
    grad = torch.rand_like(y_ref)
    expected = _grads(y_ref, (x, *params), grad)
    formats = _formats(x.dim())
    for in_fmt in formats:
        xi = x.detach().clone(memory_format=in_fmt).requires_grad_()
        for module_fmt in [torch.preserve_format, *formats]:
            m.to(memory_format=module_fmt)
            y = m(xi)
            assert_close(y, y_ref)
            assert _has_format(y, in_fmt), (in_fmt, module_fmt)
            got = _grads(y, (xi, *params), torch.empty_like(y).copy_(grad))
            assert_close(got, expected)
            assert _has_format(got[0], in_fmt), (in_fmt, module_fmt)


# ---- state dicts ----------------------------------------------------------------------------


@MODES
@pytest.mark.parametrize("entry", ENTRIES)
def test_state_dict_round_trip(entry: Entry, training: bool):
    """A state dict saved after a training step (torch.save, weights_only torch.load) loads
    strictly into another layer, which then gives the same output and state: a fresh layer, one
    that has already run (its checks and eval pass kept), and one built on the meta device and
    loaded with ``assign=True`` (deferred initialization, as model hubs load checkpoints)."""
    m = _build(entry, True)
    x = entry.input()
    m(x)
    m.train(training)
    with io.BytesIO() as f:
        torch.save(m.state_dict(), f)
        f.seek(0)
        saved = torch.load(f, weights_only=True)
    used = entry.make(dtype=F64).train(training)
    used(entry.input())
    targets = {"fresh": (entry.make(dtype=F64), False), "used": (used, False),
               "meta": (entry.make(device="meta", dtype=F64), True)}
    for how, (other, assign) in targets.items():
        other.train(training)
        result = other.load_state_dict(dict(saved), strict=True, assign=assign)
        assert not result.missing_keys and not result.unexpected_keys, how
        _assert_same_state(other, m)
    for how, (other, _) in targets.items():  # the next call: the same output and state
        ref = copy.deepcopy(m)
        assert_close(other(x), ref(x), msg=how)
        _assert_same_state(other, ref)


@MODES
@pytest.mark.parametrize("entry", ENTRIES)
def test_state_dict_to_and_from_batchnorm(entry: Entry, training: bool):
    """At G = C the state dicts of ours and torch's BatchNorm load strictly into each other,
    both ways, and the two layers then compute the same. At other G a BatchNorm checkpoint
    with running statistics is refused with a message that names num_groups; without them it
    holds the affine parameters only, which load."""
    m = _build(entry, True)
    x = entry.input()
    m(x)
    other = entry.counterpart().double()
    if entry.G != entry.num_features:
        if entry.tracking:
            with pytest.raises(RuntimeError, match=rf"num_groups={entry.G}.*num_groups="
                                                    f"{entry.num_features}"):
                m.load_state_dict(other.state_dict(), strict=True)
        else:
            m.load_state_dict(other.state_dict(), strict=True)
            for name, p in other.named_parameters():
                assert torch.equal(getattr(m, name), p), name
        return
    other.load_state_dict(m.state_dict(), strict=True)
    m.train(training), other.train(training)
    assert_close(other(x), m(x))
    back = entry.make(dtype=F64).train(training)
    back.load_state_dict(other.state_dict(), strict=True)
    _assert_same_state(back, m)
    assert_close(back(x), m(x))


# ---- factory kwargs, meta device, to_empty (test_factory_kwargs, test_device_ctx_init, ...) --


def _expected_names(entry: Entry) -> dict[str, bool]:
    """Which parameters and buffers exist (True) or are registered as None, as torch's
    BatchNorm registers them for the same arguments."""
    bn = BN[entry.dims](entry.num_features, **entry.options, device="meta")
    return {**{k: v is not None for k, v in bn._parameters.items()},
            **{k: v is not None for k, v in bn._buffers.items()}}


@pytest.mark.parametrize("entry", ENTRIES)
def test_factory_kwargs(entry: Entry):
    """device and dtype flow into every parameter and buffer (num_batches_tracked stays long),
    disabled ones are registered as None as torch's BatchNorm registers them, and a layer built
    under ``torch.device("meta")`` has the metadata of the CPU one."""
    for factory in ({"dtype": F64}, {"device": "meta"}, {"device": "meta", "dtype": torch.half}):
        m = entry.make(**factory)
        device = torch.device(factory.get("device", "cpu"))
        dtype = factory.get("dtype", torch.float32)
        present = {**{k: v is not None for k, v in m._parameters.items()},
                   **{k: v is not None for k, v in m._buffers.items()}}
        assert present == _expected_names(entry)
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            assert t.device == device, name
            assert t.dtype == (torch.long if name == "num_batches_tracked" else dtype), name
        for name in ("weight", "bias"):
            t = getattr(m, name)
            assert t is None or (isinstance(t, nn.Parameter) and t.shape == (entry.num_features,))
        for name in ("running_mean", "running_var"):
            t = getattr(m, name)
            assert t is None or t.shape == (entry.G,)
    cpu = entry.make()
    with torch.device("meta"):
        meta = entry.make()
    on_meta = [*meta.named_parameters(), *meta.named_buffers()]
    on_cpu = [*cpu.named_parameters(), *cpu.named_buffers()]
    assert [name for name, _ in on_meta] == [name for name, _ in on_cpu]
    for (name, a), (_, b) in zip(on_meta, on_cpu):
        assert a.is_meta, name
        assert (a.shape, a.dtype, a.stride(), a.requires_grad) == (
            b.shape, b.dtype, b.stride(), b.requires_grad), name


@MODES
@ENGINE_ENTRIES
def test_meta_device_and_to_empty(entry: Entry, engine: str, training: bool, request):
    """A layer on the meta device runs on meta inputs (shape only); ``to_empty`` then gives real
    parameters on the CPU which, once reset, compute as a layer built there (torch's
    test_to_empty)."""
    _use_engine(engine, request)
    if training and entry.tracking and entry.options.get("momentum", 0.1) is None:
        pytest.skip("a cumulative average reads num_batches_tracked as a Python number, which "
                    "a meta tensor does not have (torch's BatchNorm raises the same)")
    m = entry.make(device="meta").train(training)
    y = m(torch.empty(entry.shape, device="meta"))
    assert y.is_meta and y.shape == entry.shape
    m.to_empty(device="cpu")
    assert all(isinstance(p, nn.Parameter) and p.device.type == "cpu" for p in m.parameters())
    m.reset_parameters()
    x = entry.input(torch.float32)
    assert_close(m(x), entry.make().train(training)(x))


# ---- errors (test_errors) -------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorInput:
    """A layer (C = 10 unless ``kwargs`` says num_features) that must raise ``error`` matching
    ``pattern`` at construction (``shapes`` empty) or on the last of its inputs ``shapes[dims]``
    (the ones before it pass), at each num_groups of ``groups``. ``torch_too``: torch's
    BatchNorm raises the same (the control runs it)."""

    desc: str
    kwargs: tuple[tuple[str, Any], ...]
    groups: tuple[Any, ...]  # the num_groups it applies to ("C", "2C" or a constant)
    shapes: dict[int, tuple[tuple[int, ...], ...]]
    training: bool
    error: type[Exception]
    pattern: str
    torch_too: bool = False


_C = 10
_SHAPES = {1: (2, _C), 2: (2, _C, 5, 5), 3: (2, _C, 4, 4, 4)}  # torch's error inputs
ERROR_INPUTS = [
    # torch's (module_error_inputs_torch_nn_BatchNorm1d_2d_3d)
    ErrorInput("eps_negative", (("eps", -1.0),), GROUPS, {d: (s,) for d, s in _SHAPES.items()},
               True, ValueError, "eps must be positive", torch_too=True),
    ErrorInput("eps_zero", (("eps", 0.0),), GROUPS, {d: (s,) for d, s in _SHAPES.items()},
               True, ValueError, "eps must be positive", torch_too=True),
    # ours, where torch's BatchNorm defines the behaviour too
    ErrorInput("eps_negative_eval", (("eps", -1.0),), GROUPS,
               {d: (s,) for d, s in _SHAPES.items()}, False, ValueError,
               "eps must be non-negative", torch_too=True),
    ErrorInput("input_dims_low", (), GROUPS,
               {1: ((2,),), 2: ((2, _C, 5),), 3: ((2, _C, 4, 4),)}, True, ValueError,
               r"expected (2D or 3D|4D|5D) input \(got (1D|3D|4D) input\)", torch_too=True),
    ErrorInput("input_dims_high", (), GROUPS,
               {1: ((2, _C, 3, 3),), 2: ((2, _C, 5, 5, 5),), 3: ((2, _C, 4, 4, 4, 4),)}, False,
               ValueError, r"expected (2D or 3D|4D|5D) input \(got (4D|5D|6D) input\)",
               torch_too=True),
    ErrorInput("one_value_per_group", (), ("C",),
               {1: ((1, _C),), 2: ((1, _C, 1, 1),), 3: ((1, _C, 1, 1, 1),)}, True, ValueError,
               "(?i)expected more than 1 value per", torch_too=True),
    ErrorInput("one_value_per_band", (), ("2C",),
               {1: ((1, _C, 2),), 2: ((1, _C, 1, 2),), 3: ((1, _C, 1, 1, 2),)}, True,
               ValueError, "expected more than 1 value per group when training"),
    # ours only
    ErrorInput("channels", (), GROUPS,
               {1: ((2, 8),), 2: ((2, 8, 5, 5),), 3: ((2, 8, 4, 4, 4),)}, True, ValueError,
               rf"expected input with {_C} channels \(dim 1\), got 8 channels"),
    ErrorInput("integer_input", (), GROUPS,
               {d: (s,) for d, s in _SHAPES.items()}, True, TypeError,
               "expected a floating-point input"),
    ErrorInput("groups_not_dividing_D", (), ("2C", 4),
               {1: ((2, _C, 3),), 2: ((2, _C, 3, 3),), 3: ((2, _C, 1, 3, 3),)}, True, ValueError,
               r"num_groups=(20|4) must divide D = "),
    ErrorInput("straddling_layout", (), (4,),
               {1: ((2, _C, 2), (2, _C, 4)), 2: ((2, _C, 2, 2), (2, _C, 4, 4)),
                3: ((2, _C, 1, 2, 2), (2, _C, 1, 4, 4))}, False, ValueError,
               r"groups straddle channel boundaries .* laid out for spatial size"),
    ErrorInput("num_groups_zero", (), (0,), {}, True, ValueError,
               "num_groups must be a positive int, got 0"),
    ErrorInput("num_groups_negative", (), (-2,), {}, True, ValueError,
               "num_groups must be a positive int, got -2"),
    ErrorInput("num_groups_float", (), (2.0,), {}, True, TypeError,
               "num_groups must be a positive int, got float 2.0"),
    ErrorInput("num_groups_bool", (), (True,), {}, True, TypeError,
               "num_groups must be a positive int, got bool True"),
    ErrorInput("num_groups_str", (), ("4",), {}, True, TypeError,
               "num_groups must be a positive int, got str '4'"),
    ErrorInput("num_features_zero", (("num_features", 0),), (1,), {}, True, ValueError,
               "num_features must be a positive int"),
]


def _error_params() -> list[Any]:
    params = []
    for err in ERROR_INPUTS:
        for dims in (1, 2, 3):
            if err.torch_too:
                params.append(pytest.param(err, dims, None, id=f"{BN[dims].__name__}-{err.desc}"))
            for g in err.groups:
                g_value = {"C": _C, "1": 1, "2": 2, "2C": 2 * _C}.get(g, g)
                params.append(pytest.param(err, dims, g_value,
                                           id=f"{BGN[dims].__name__}-{err.desc}-G={g}"))
    return params


@pytest.mark.parametrize("err,dims,groups", _error_params())
def test_errors(err: ErrorInput, dims: int, groups: Any):
    """Each error input raises the expected exception with the expected message, which names
    the layer (its short repr at forward, its class at construction); torch's BatchNorm raises
    the same where it defines the behaviour (``torch_too``)."""
    kwargs = dict(err.kwargs)
    c = kwargs.pop("num_features", _C)
    cls = BN[dims] if groups is None else BGN[dims]
    args = (c,) if groups is None else (c, groups)
    if not err.shapes:
        with pytest.raises(err.error, match=err.pattern) as info:
            cls(*args, **kwargs)
        assert str(info.value).startswith(f"{cls.__name__}: ")
        return
    m = cls(*args, **kwargs).train(err.training)
    *before, last = err.shapes[dims]
    for shape in before:
        m(torch.randn(shape))
    x = torch.zeros(last, dtype=torch.long) if err.desc == "integer_input" else torch.randn(last)
    with pytest.raises(err.error, match=err.pattern) as info:
        m(x)
    if groups is not None:
        assert str(info.value).startswith(m._describe() + ": "), str(info.value)


@pytest.mark.parametrize("groups", [None, *GROUPS], ids=["BatchNorm", *(f"G={g}" for g in GROUPS)])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_eps_zero_in_eval_is_allowed_like_torch(dims: int, groups: str | None):
    """The other side of the eps errors: torch's batch_norm takes eps = 0 with running
    statistics (eval), dividing by the running standard deviation, and so do ours."""
    shape = {1: (2, _C, 4), 2: (2, _C, 4, 4), 3: (2, _C, 2, 2, 2)}[dims]
    g = None if groups is None else {"C": _C, "1": 1, "2": 2, "2C": 2 * _C}[groups]
    m = (BN[dims](_C, eps=0.0) if g is None else BGN[dims](_C, g, eps=0.0)).double().eval()
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    x = torch.randn(shape, dtype=F64)
    expected = bgn_eval_ref(x, g or _C, m.running_mean, m.running_var, m.weight, m.bias, 0.0)
    assert_close(m(x), expected)


@MODES
@pytest.mark.parametrize("entry", [pytest.param(p.values[0], id=p.id) for p in ENTRIES
                                   if p.marks])
def test_skipped_entries_are_refused(entry: Entry, training: bool):
    """The entries the table skips (G does not divide D) are refused with the divisibility
    message naming the layer: never a silent answer."""
    m = entry.make().train(training)
    with pytest.raises(ValueError, match=rf"num_groups={entry.G} must divide D = ") as info:
        m(entry.input(torch.float32))
    assert str(info.value).startswith(m._describe() + ": ")


# ---- gradcheck / gradgradcheck (test_grad, test_gradgrad) ------------------------------------


def _check_gradients(entry: Entry, training: bool, check, fast_mode: bool) -> None:
    """The reference's gradient check: the total derivative in the input and every parameter,
    then the partial derivative in the input and each parameter alone; float64, batched
    gradients checked (vmap over the backward) as torch's test wrapper does."""
    m = _build(entry, training)
    x = entry.input(requires_grad=True)
    params = _params(m)

    def fn(input, *_):  # the parameters are perturbed in place, the layer reads them
        return m(input)

    assert check(fn, (x, *params), fast_mode=fast_mode, check_batched_grad=True)
    for p in params:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        assert check(fn, (x, *params), fast_mode=fast_mode, check_batched_grad=True)
        p.requires_grad_(False)


@MODES
@GRADIENT_ENTRIES
def test_grad(entry: Entry, engine: str, fast_mode: bool, training: bool, request):
    _use_engine(engine, request)
    _check_gradients(entry, training, torch.autograd.gradcheck, fast_mode)


@MODES
@GRADIENT_ENTRIES
def test_gradgrad(entry: Entry, engine: str, fast_mode: bool, training: bool, request):
    _use_engine(engine, request)
    _check_gradients(entry, training, torch.autograd.gradgradcheck, fast_mode)


# ---- the output in in-place operations; empty batches ---------------------------------------


@MODES
@ENGINE_ENTRIES
def test_output_allows_inplace_ops(entry: Entry, engine: str, training: bool, request):
    """The forward leaves its input alone, and its output can be modified in place (an
    in-place activation after the norm, as in ResNets) with the gradients of the out-of-place
    composition."""
    _use_engine(engine, request)
    m = _build(entry, training)
    x = entry.input(requires_grad=True)
    params = _params(m)
    version = x._version
    y = m(x)
    assert x._version == version
    grad = torch.randn_like(y)
    expected = _grads(torch.relu(y * 2), (x, *params), grad)
    y = m(x)
    y.mul_(2).relu_()
    assert_close(_grads(y, (x, *params), grad), expected)


@MODES
@pytest.mark.parametrize("entry", _select(lambda e: e.empty))
def test_empty_input_like_torch(entry: Entry, training: bool):
    """An empty input gives what torch's BatchNorm gives for it: an empty output of the input's
    shape, dtype and memory format, an empty input gradient, zero parameter gradients, running
    statistics left alone and num_batches_tracked counted."""
    results = []
    for m in (_build(entry, training), _build(Entry(entry.dims, entry.desc, entry.num_features,
                                                    entry.kwargs, entry.shape, None), training)):
        before = _state(m)
        x = entry.input(requires_grad=True)
        y = m(x)
        grads = _grads(y, (x, *_params(m)), torch.randn_like(y))
        after = _state(m)
        for name in ("running_mean", "running_var"):
            if name in before:
                assert torch.equal(after[name], before[name]), name
        results.append((y, grads, after.get("num_batches_tracked")))
    (y, grads, tracked), (y_bn, grads_bn, tracked_bn) = results
    assert y.shape == y_bn.shape == entry.shape and y.dtype == y_bn.dtype
    assert len(grads) == len(grads_bn)
    for g, g_bn in zip(grads, grads_bn):
        assert g.shape == g_bn.shape and torch.equal(g, g_bn)
    assert (tracked is None and tracked_bn is None) or torch.equal(tracked, tracked_bn)


# ---- CUDA: test_cpu_gpu_parity, test_multiple_device_transfer -------------------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
@MODES
@pytest.mark.parametrize("entry", ENTRIES)
def test_cpu_gpu_parity(entry: Entry, training: bool):
    """The same layer on the CPU and the GPU gives the same outputs, gradients and state, over
    a few steps (float64: no TF32)."""
    cpu = _build(entry, training)
    gpu = copy.deepcopy(cpu).cuda()
    x = entry.input(requires_grad=True)
    xg = x.detach().cuda().requires_grad_()
    for _ in range(3):
        y, yg = cpu(x), gpu(xg)
        assert_close(yg.cpu(), y)
        grad = torch.randn_like(y)
        got = _grads(yg, (xg, *_params(gpu)), grad.cuda())
        assert_close([g.cpu() for g in got], list(_grads(y, (x, *_params(cpu)), grad)))
        _assert_same_state(gpu.cpu(), cpu)
        gpu.cuda()


@CUDA
@MODES
@pytest.mark.parametrize("entry", ENTRIES)
def test_multiple_device_transfer(entry: Entry, training: bool):
    """A layer moved GPU -> CPU -> GPU runs on each device with everything on that device."""
    m = _build(entry, training).cuda()
    x = entry.input()
    for device in ("cuda", "cpu", "cuda"):
        m.to(device)
        y = m(x.to(device))
        assert y.device.type == device
        assert all(t.device.type == device for t in [*m.parameters(), *m.buffers()])


def test_table_covers_torch_inputs_and_every_group_count():
    """The harness's own table: every torch BatchNorm input, each at G = C, 1, 2, 2C plus the
    control; and what is skipped is only what G cannot divide."""
    ids = [p.id for p in ENTRIES]
    for dims, inputs in TORCH_INPUTS.items():
        for desc, *_ in inputs:
            assert f"{BN[dims].__name__}-{desc}" in ids
            for name in GROUPS:
                assert f"{BGN[dims].__name__}-{desc}-G={name}" in ids
    for p in ENTRIES:
        if p.marks:
            entry = p.values[0]
            assert re.match(r"G=\d+ does not divide D", p.marks[0].kwargs["reason"])
            assert (entry.num_features * math.prod(entry.shape[2:])) % entry.G != 0
