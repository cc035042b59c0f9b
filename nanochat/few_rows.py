"""Products of a few rows against a weight on CPUs: the matrix products of a decode step.

x (rows, C) @ weightᵀ with a handful of rows runs on CPUs at a fraction of memory bandwidth, and which kernel is
fastest depends on the CPU, the dtype, the shape and the row count: x @ weightᵀ (F.linear), weight @ xᵀ (one row
doubled: alone it takes the slower matrix-vector path) or oneDNN's linear on a copy of the weight in oneDNN's layout.
On an AMD EPYC one fp32 row of the 32768×256 LM head took 5.1, 1.6 and 2.1 ms in these forms; on an Intel Xeon
x @ weightᵀ was the fastest at 1.2 ms against 2.7 for weight @ xᵀ (DEVELOPERS.md, "CPU figures"). The block
linears' weights (0.25-1 MB) are read from memory as well in a decode step, as the LM head evicts them from the
caches: there weight @ xᵀ took half as long as x @ weightᵀ on the AMD EPYC, while timed alone in a loop, where
the weight stays in cache, it was the slower one. So each key (rows, weight shape, dtype, the forms) times its
forms where they really run: its first calls go to each form in turn, TRIALS timed calls each after an untimed one
(which may build the oneDNN copy), and from then on the form of least median time serves the key, for the process.
Anything else (other devices and dtypes, more rows, autograd, torch.compile) is F.linear.
"""

import statistics
import time
import weakref

import torch
import torch.nn.functional as F

FEW_ROWS = 32  # up to this many rows a CPU product runs in the fastest of its forms
TRIALS = 5  # timed calls of each form before a key settles on one
_clock = time.perf_counter
_CHOICE: dict[tuple, int] = {}  # key → index in its forms of the form measured fastest
_TRIALS: dict[tuple, list[list[float]]] = {}  # key still being measured → each form's call times so far
_ONEDNN_WEIGHTS: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}  # id(weight) → (its stamp, its oneDNN copy)


def skinny(flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight @ flatᵀ, handed back transposed in memory: a copy into row order cost more than the strided reads
    after it (DEVELOPERS.md)."""
    rows = flat.size(0)
    if rows == 1:
        flat = torch.cat([flat, flat])  # a real second row: a stride-0 view would take the matrix-vector path again
    return (weight @ flat.T)[:, :rows].T


def onednn(flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """flat @ weightᵀ by oneDNN, on a copy of the weight in oneDNN's layout, made again whenever the weight changed
    (an in-place update bumps its version, a new tensor has another storage); freed with the weight, or as soon as
    no key that settled chose this form."""
    stamp = (weight._version, weight.data_ptr())
    held = _ONEDNN_WEIGHTS.get(id(weight))
    if held is None or held[0] != stamp:
        if held is None:
            weakref.finalize(weight, _ONEDNN_WEIGHTS.pop, id(weight), None)
        held = _ONEDNN_WEIGHTS[id(weight)] = (stamp, weight.detach().to_mkldnn())
    return torch._C._nn.mkldnn_linear(flat.to_mkldnn(), held[1], None).to_dense()


LINEAR_FORMS = (F.linear, skinny)  # oneDNN was the slowest for the block linears' small weights (DEVELOPERS.md)
LM_HEAD_FORMS = LINEAR_FORMS + ((onednn,) if torch.backends.mkldnn.is_available() else ())


def _settle(key: tuple, forms: tuple, times: list[list[float]]) -> None:
    medians = [statistics.median(t[1:]) for t in times]  # each form's first call is untimed
    _CHOICE[key] = medians.index(min(medians))
    del _TRIALS[key]
    if not _TRIALS and all(k[-1][i] is not onednn for k, i in _CHOICE.items()):
        _ONEDNN_WEIGHTS.clear()  # no settled key uses the copies: do not hold a second LM head for the process


def product(x: torch.Tensor, weight: torch.Tensor, forms: tuple = LINEAR_FORMS) -> torch.Tensor:
    """x (..., C) @ weightᵀ → (..., V), weight (V, C) in x's dtype, in the fastest of `forms` for this key."""
    rows = x.numel() // x.size(-1)
    if (x.device.type != "cpu" or torch.compiler.is_compiling() or torch.is_grad_enabled() or rows > FEW_ROWS
            or x.dtype not in (torch.float32, torch.bfloat16)):
        return F.linear(x, weight)
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
    return out.view(*x.shape[:-1], weight.size(0))
