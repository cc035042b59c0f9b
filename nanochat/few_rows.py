"""Products of a few rows against a weight on CPUs: the matrix products of a decode step.

x (rows, C) @ weightᵀ with a handful of rows runs on CPUs at a fraction of memory bandwidth, and which kernel is
fastest depends on the CPU, the dtype, the shape and the row count: x @ weightᵀ (F.linear), weight @ xᵀ (one row
doubled: alone it takes the slower matrix-vector path) or oneDNN's linear on a copy of the weight in oneDNN's layout.
On an AMD EPYC one fp32 row of the 32768×256 LM head took 5.1, 1.6 and 2.1 ms in these forms; on an Intel Xeon
x @ weightᵀ was the fastest at 1.2 ms against 2.7 for weight @ xᵀ. The block
linears' weights (0.25-1 MB) are read from memory as well in a decode step, as the LM head evicts them from the
caches: there weight @ xᵀ took half as long as x @ weightᵀ on the AMD EPYC, while timed alone in a loop, where
the weight stays in cache, it was the slower one. So each key (rows, weight shape, dtype, the forms) times its
forms where they really run: its first calls go to each form in turn, TRIALS timed calls each after an untimed one
(which may build the oneDNN copy), and from then on the form of least median time serves the key, for the process.
A compiled decode step (torch.compile, outside autograd) calls the same products as one opaque operator,
`nanochat::few_rows_product`, so that Inductor fuses the small ops around them and leaves the products to the
measured forms (its own code for them was the slow x @ weightᵀ form). Anything else (other devices
and dtypes, more rows, autograd) is F.linear.
"""

import statistics
import time
import weakref

import torch
import torch.nn.functional as F

FEW_ROWS = 32  # up to this many rows a CPU product runs in the fastest of its forms
TRIALS = 5  # timed calls of each form before a key settles on one
STACK_BELOW = 1 << 20  # bytes: weights up to this size are stacked for one product (`stacked`)
_clock = time.perf_counter
_TIMED_DTYPES = (torch.float32, torch.bfloat16)
_CHOICE: dict[tuple, int] = {}  # key → index in its forms of the form measured fastest
_TRIALS: dict[tuple, list[list[float]]] = {}  # key still being measured → each form's call times so far
_HELD: dict[tuple, tuple[tuple, torch.Tensor]] = {}  # (kind, ids of the weights) → (their stamps, the copy)


def skinny(flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight @ flatᵀ, handed back transposed in memory: a copy into row order cost more than the strided reads
    after it."""
    rows = flat.size(0)
    if rows == 1:
        flat = torch.cat([flat, flat])  # a real second row: a stride-0 view would take the matrix-vector path again
    return (weight @ flat.T)[:, :rows].T


def held_copy(kind: tuple, weights: tuple[torch.Tensor, ...], build) -> torch.Tensor:
    """build(), a copy derived from `weights` (in oneDNN's layout; stacked), held and made again whenever one of
    them changed (an in-place update bumps its version, a new tensor has another storage: RL's updates, the
    engine's refreshed weights); freed with the first of them."""
    key = (*kind, *map(id, weights))
    stamp = tuple((w._version, w.data_ptr()) for w in weights)
    held = _HELD.get(key)
    if held is None or held[0] != stamp:
        if held is None:
            weakref.finalize(weights[0], _HELD.pop, key, None)
        held = _HELD[key] = (stamp, build())
    return held[1]


def stackable(weights: tuple[torch.Tensor, ...], dtype: torch.dtype) -> bool:
    """Whether `stacked` stacks these: the largest at most STACK_BELOW bytes in `dtype`."""
    return max(w.numel() for w in weights) * dtype.itemsize <= STACK_BELOW


def stacked(weights: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """The weights stacked along their rows, in `dtype`, for one product in place of several of one input (a
    decode step's q, k and v), which reads them as one stream rather than several short ones; None when the
    largest is above STACK_BELOW, where a product alone streams well enough not to hold a copy."""
    if not stackable(weights, dtype):
        return None
    return held_copy(("stacked", dtype), weights, lambda: torch.cat([w.detach().to(dtype) for w in weights]))


def onednn(flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """flat @ weightᵀ by oneDNN, on a copy of the weight in oneDNN's layout (`held_copy`), dropped as soon as no
    key that settled chose this form."""
    copy = held_copy(("onednn",), (weight,), lambda: weight.detach().to_mkldnn())
    return torch._C._nn.mkldnn_linear(flat.to_mkldnn(), copy, None).to_dense()


LINEAR_FORMS = (F.linear, skinny)  # oneDNN was the slowest for the block linears' small weights
LM_HEAD_FORMS = LINEAR_FORMS + ((onednn,) if torch.backends.mkldnn.is_available() else ())


def _settle(key: tuple, forms: tuple, times: list[list[float]]) -> None:
    medians = [statistics.median(t[1:]) for t in times]  # each form's first call is untimed
    _CHOICE[key] = medians.index(min(medians))
    del _TRIALS[key]
    # keys without the oneDNN form (a short prompt's block linears may never settle) do not keep the copies alive
    if (not any(onednn in k[-1] for k in _TRIALS)
            and all(k[-1][i] is not onednn for k, i in _CHOICE.items())):
        for copy in [k for k in _HELD if k[0] == "onednn"]:  # no settled key uses them: no second LM head held
            del _HELD[copy]


def _timed_rows(x: torch.Tensor) -> bool:
    """CPU, fp32 or bf16, up to FEW_ROWS rows, outside autograd: products whose forms are timed. A decode step makes
    some thirty of these checks and products, so the cheapest checks come first (each Python-level tensor call
    costs 0.5-1.5 µs on a 2-core CPU)."""
    return (x.is_cpu and not torch.is_grad_enabled() and x.dtype in _TIMED_DTYPES
            and x.shape[:-1].numel() <= FEW_ROWS)


def measured(x: torch.Tensor) -> bool:
    """Whether products of x run in their measured forms here: `_timed_rows`, outside torch.compile."""
    return not torch.compiler.is_compiling() and _timed_rows(x)


def traced(x: torch.Tensor) -> bool:
    """Whether products of x are being traced by torch.compile where they would otherwise be measured: they become
    calls of the opaque operator, which measures them when the compiled code runs."""
    return torch.compiler.is_compiling() and _timed_rows(x)


FORM_SETS = {"linear": LINEAR_FORMS, "lm_head": LM_HEAD_FORMS}  # what the opaque operator can be asked for


@torch.library.custom_op("nanochat::few_rows_product", mutates_args=())
def _opaque_product(x: torch.Tensor, weights: list[torch.Tensor], forms: str) -> torch.Tensor:
    """x @ [weights stacked]ᵀ in the measured form, as one operator that torch.compile does not look into; its
    output is in row order (the weight @ xᵀ form leaves it transposed), as the traced graph expects."""
    weight = weights[0] if len(weights) == 1 else stacked(tuple(weights), x.dtype)
    return product(x, weight, FORM_SETS[forms]).contiguous()


@_opaque_product.register_fake
def _(x: torch.Tensor, weights: list[torch.Tensor], forms: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], sum(w.size(0) for w in weights)))


def joint_product(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """x @ [weights stacked]ᵀ in one measured product (a decode step's q, k and v: `stacked`), eager or compiled;
    None where products of x are not measured ones or a weight is too large to stack."""
    if not stackable(weights, x.dtype):
        return None
    if measured(x):
        return product(x, stacked(weights, x.dtype))
    if traced(x):
        return _opaque_product(x, list(weights), "linear")
    return None


def product(x: torch.Tensor, weight: torch.Tensor, forms: tuple = LINEAR_FORMS) -> torch.Tensor:
    """x (..., C) @ weightᵀ → (..., V), weight (V, C) in x's dtype, in the fastest of `forms` for this key."""
    if not measured(x):
        if traced(x):
            # by equality: torch.compile does not keep the identity of the tuple passed in
            name = next((name for name, known in FORM_SETS.items() if known == forms), None)
            if name is not None:
                return _opaque_product(x, [weight], name)
        return F.linear(x, weight)
    lead = x.shape[:-1]
    rows = lead.numel()
    flat = x.reshape(rows, x.size(-1))
    key = (rows, *weight.shape, x.dtype, forms)
    choice = _CHOICE.get(key)
    if choice is not None:
        out = forms[choice](flat, weight)
    else:
        times = _TRIALS.setdefault(key, [[] for _ in forms])
        form = min(range(len(forms)), key=lambda i: len(times[i]))  # in turn
        t0 = _clock()
        out = forms[form](flat, weight)
        times[form].append(_clock() - t0)
        if all(len(t) > TRIALS for t in times):
            _settle(key, forms, times)
    return out.view(*lead, weight.size(0))
