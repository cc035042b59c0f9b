"""Sampling the next token of every row on the device: temperature, top-k, top-p, one uniform draw per row.

No host reads: how many candidate tokens are looked at (`candidates`) is decided on the host from the rows'
settings (`sampler_candidates`), so the same code runs eagerly, compiled, or inside a captured CUDA graph.
"""

import torch

TOP_K_BUCKETS = (64, 256)  # candidate counts for rows that all have a top-k (the server allows top-k up to 200)


def sampler_candidates(settings: list[tuple[float, int | None]], vocab_size: int) -> int:
    """How many candidates the sampler needs for rows of (temperature, top_k): 0 when every row is greedy; the
    smallest bucket ≥ every sampling row's top-k when they all have one; else the whole vocabulary."""
    sampling = [k or 0 for t, k in settings if t > 0]
    if not sampling:
        return 0
    if min(sampling) > 0:
        for bucket in TOP_K_BUCKETS:
            if max(sampling) <= bucket < vocab_size:
                return bucket
    return vocab_size


def soft_cap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap · tanh(logits / softcap) in fp32, the model's cap of its logits (None: logits as they are)."""
    logits = logits.float()
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  uniform: torch.Tensor, candidates: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One token per row, each row with its own settings and its own uniform draw; no Python loop over rows.

    logits (B, V); temperature (B,) (0 = greedy); top_k (B,) long (0 = no top-k); top_p (B,) (1 = off);
    uniform (B,) in [0, 1). Sampling is by inverse CDF over the candidate tokens in id order (the first token whose
    cumulative probability exceeds the row's draw), so a row's token depends only on its own logits, settings and
    draw, not on which rows it is batched with. `candidates` (see `sampler_candidates`; None = work it out here,
    which reads the settings back to the host) bounds the tokens looked at: the best `candidates` ones, which
    is much cheaper than the whole vocabulary, and is exact whenever every sampling row's top-k fits.

    `softcap`: the logits are the model's before its soft-cap (`soft_cap`), which is applied here, and with fewer
    candidates than the vocabulary to the candidates only: tanh keeps the order, so the best logits are the best
    capped ones, and the cap of the whole vocabulary cost as much as the rest of a CPU step's sampling (0.5 ms,
    most of it tanh, at eight rows of 32768 on a 2-core AMD EPYC). The greedy token is then the first best of the
    capped candidates (where the cap rounds several logits to one value, the lowest id among them), as over the
    whole capped vocabulary unless more than `candidates` logits round to its best value.
    """
    V = logits.size(-1)
    if candidates is None:
        candidates = sampler_candidates(list(zip(temperature.tolist(), top_k.tolist())), V)
    if candidates in (0, V):
        logits = soft_cap(logits, softcap)
        greedy = logits.max(dim=-1).indices  # (B,) the first best, as argmax, which is 2-3× slower on a CPU
    if candidates == 0:
        return greedy
    sampling = temperature > 0
    scale = torch.where(sampling, temperature, torch.ones_like(temperature))[:, None]  # (B, 1)
    k = torch.where(top_k > 0, top_k, V).clamp(max=candidates)  # (B,)
    if candidates < V:  # a positive temperature keeps the order, so only the candidates need dividing
        ranked, ids = torch.topk(logits.float(), candidates, dim=-1)  # (B, K), best first
        ranked = soft_cap(ranked, softcap)
        greedy = torch.where(ranked == ranked[:, :1], ids, V).min(dim=-1).values  # the first best
        ranked = (ranked / scale).masked_fill(torch.arange(candidates, device=logits.device)[None, :] >= k[:, None],
                                              float("-inf"))
        values = ranked
    else:  # the whole vocabulary, in id order; a row's top-k drops what is below its k-th best
        x = logits.float() / scale  # (B, V)
        ranked, ids = x.sort(dim=-1, descending=True).values, None
        kth = ranked.gather(-1, k[:, None] - 1)  # (B, 1)
        ranked = ranked.masked_fill(ranked < kth, float("-inf"))
        values = x.masked_fill(x < kth, float("-inf"))
    # nucleus: keep the best tokens until their mass reaches top_p (rows with top_p >= 1 keep everything)
    p = torch.softmax(ranked, dim=-1)
    keep = ((p.cumsum(dim=-1) - p) < top_p[:, None]) | (top_p[:, None] >= 1)
    keep[:, 0] = True  # the most likely token always stays
    cutoff = torch.where(keep, ranked, torch.full_like(ranked, float("inf"))).min(dim=-1, keepdim=True).values
    values = values.masked_fill(values < cutoff, float("-inf"))
    if ids is not None:  # candidates back in id order, as in the whole-vocabulary case
        order = ids.argsort(dim=-1)
        ids, values = ids.gather(-1, order), values.gather(-1, order)
    cdf = torch.softmax(values, dim=-1).cumsum(dim=-1)  # (B, K)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]  # in [0, total)
    choice = (cdf <= target).sum(dim=-1).clamp(max=cdf.size(-1) - 1)  # first cdf > target: never a p = 0 token
    token = choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(sampling, token, greedy)


def sampling_params(rows: int, temperature: float, top_k: int | None, top_p: float,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(temperature, top_k, top_p) tensors of `rows` rows sharing one setting; top_k None or 0 = no top-k."""
    return (torch.full((rows,), float(temperature), device=device),
            torch.full((rows,), int(top_k or 0), dtype=torch.long, device=device),
            torch.full((rows,), float(top_p), device=device))
