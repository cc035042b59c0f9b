"""A preallocated key/value cache with one slot per sequence, each slot at its own position (continuous batching),
and `StaticRows`, the fixed-shape view of it that a decode step (nanochat/decode.py) appends to."""

import torch


class KVCache:
    """Keys and values of every layer for `batch_size` independent sequence slots.

    k, v: (n_layer, slots, n_kv_head, max_seq_len + 1, head_dim) in the compute dtype, allocated once and never
    resized (resizing in place is how the reference lost the cache's layout). `pos[s]` is how many tokens slot s
    holds. The extra last position is never read: rows that sit out a static decode step write there.
    """

    aligned = False  # rows may hold different lengths: attention masks what lies past each row's end (StaticRows)
    shared = 0  # no positions known to be the same in every row (StaticRows)

    def __init__(self, batch_size: int, n_layer: int, n_kv_head: int, head_dim: int, max_seq_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_kv_head, max_seq_len + 1, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.layers = torch.arange(n_layer, device=device)  # layer indices as device tensors (StaticRows' writes)
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.read_length = 0
        # (slots, n_embd): each slot's last token embedding, for the model's smear; allocated on first use
        self.prev_embedding: torch.Tensor | None = None

    def reset(self, slots: list[int] | torch.Tensor | None = None) -> None:
        """Forget what the given slots (default: all) hold; the memory is reused, not freed."""
        if slots is None:
            self.pos.zero_()
        else:
            self.pos[torch.as_tensor(slots, dtype=torch.long, device=self.pos.device)] = 0

    def copy_slot(self, src: int, dsts: list[int], length: int | None = None) -> None:
        """Duplicate one slot's history into others: prefill a prompt once, then sample many continuations.
        `length`: how many tokens the slot holds, when the caller knows (saves reading it back from the device)."""
        if not dsts:
            return
        n = int(self.pos[src]) if length is None else length
        dst = torch.as_tensor(dsts, dtype=torch.long, device=self.k.device)
        self.k[:, dst, :, :n] = self.k[:, src:src + 1, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src:src + 1, :, :n]
        self.pos[dst] = n
        if self.prev_embedding is not None:
            self.prev_embedding[dst] = self.prev_embedding[src].clone()

    def resolve_slots(self, slots: torch.Tensor | list[int] | None, batch: int) -> slice | torch.Tensor:
        """The cache rows of a batch: a slice when they are consecutive (the engine keeps its live rows first), so
        reads are views instead of gathered copies; otherwise an index tensor."""
        if slots is None:
            return slice(0, batch)
        if isinstance(slots, torch.Tensor):
            return slots.to(device=self.pos.device, dtype=torch.long)
        slots = list(slots)
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        return torch.tensor(slots, dtype=torch.long, device=self.pos.device)

    def positions(self, slots: slice | torch.Tensor, t: int) -> torch.Tensor:
        """Absolute positions (B, t) of t new tokens appended to each slot; raises when a slot would overflow.
        Also fixes how far this forward pass reads the cache (`read_length`), once rather than per layer."""
        start = self.pos[slots]
        end = int(start.max()) + t
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: {end - t} + {t} tokens > max_seq_len {self.max_seq_len}")
        self.read_length = end
        return start[:, None] + torch.arange(t, device=start.device)[None, :]

    def write_and_read(self, layer: int, slots: slice | torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, t, H_kv, D) at their positions; return each slot's keys/values (B, H_kv, L, D) up to the
        longest slot's end (positions past a slot's own end are masked by attention)."""
        kc, vc = self.k[layer], self.v[layer]
        if isinstance(slots, slice):
            kc, vc = kc[slots], vc[slots]
            rows = torch.arange(kc.size(0), device=kc.device)[:, None]
        else:
            rows = slots[:, None]
        kc[rows, :, positions] = k.to(kc.dtype)
        vc[rows, :, positions] = v.to(vc.dtype)
        L = self.read_length
        if isinstance(slots, slice):
            return kc[:, :, :L], vc[:, :, :L]
        return kc[:, :, :L].index_select(0, slots), vc[:, :, :L].index_select(0, slots)

    def previous_embeddings(self, slots: slice | torch.Tensor, n_embd: int, dtype: torch.dtype) -> torch.Tensor:
        """The last embedding each slot saw (B, n_embd); zeros for a slot that saw none."""
        if self.prev_embedding is None:
            self.prev_embedding = torch.zeros(self.batch_size, n_embd, device=self.pos.device, dtype=dtype)
        return self.prev_embedding[slots]

    def remember_embeddings(self, slots: slice | torch.Tensor, emb: torch.Tensor) -> None:
        self.prev_embedding[slots] = emb.to(self.prev_embedding.dtype)

    def advance(self, slots: torch.Tensor, t: int) -> None:
        self.pos[slots] += t


class StaticRows:
    """Rows 0..rows-1 of a KVCache as a decode step sees them: one new token per row, fixed shapes, no host reads.

    Each row writes its token's key/value at its own position and attends to the first `read_length` positions
    (the caller picks it ≥ every taking-part row's length + 1). Rows with `active` False (finished, waiting on a
    tool, still prefilling, or padding up to the bucket) write to the cache's spare last position and keep their
    position, so a step leaves them exactly as they were.

    `aligned`: every active row holds exactly read_length - 1 tokens (the samples of one prompt), so each attends
    to all read_length positions and attention needs no mask (what inactive rows compute is never used).
    `shared` (aligned steps only): positions 0..shared-1 hold the same keys and values in every row (the prompt,
    prefilled once and copied to each sample's row), so attention reads them once, from row 0.
    """

    def __init__(self, cache: KVCache, rows: int, read_length: int, active: torch.Tensor, aligned: bool = False,
                 shared: int = 0):
        self.cache, self.rows, self.read_length, self.active = cache, rows, read_length, active  # active (rows,)
        self.aligned = aligned
        self.shared = shared if aligned else 0
        self._index: tuple | None = None  # (rows, heads, where) of the writes, the same in every layer of a step

    def resolve_slots(self, slots, batch: int) -> slice:
        return slice(0, self.rows)

    def positions(self, slots, t: int) -> torch.Tensor:
        """(rows, 1): each row's next position; clamped for rows that sit out, whose own may lie past the read."""
        return self.cache.pos[:self.rows, None].clamp(max=self.read_length - 1)

    def write_and_read(self, layer: int, slots, positions: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (rows, 1, H_kv, D) → the rows' keys/values (rows, H_kv, read_length, D), views of the cache."""
        c = self.cache
        if self._index is None:  # built once per step: each layer's write goes to the same rows and positions
            where = torch.where(self.active[:, None], positions, c.max_seq_len)  # (rows, 1)
            rows = torch.arange(self.rows, device=c.k.device)[:, None]
            heads = torch.arange(k.size(2), device=c.k.device)[None, :]
            self._index = (rows, heads, where)
        rows, heads, where = self._index
        # Indexed on the whole cache tensor, not on a view of it: under torch.compile a write into a view of a
        # graph input is functionalised into a copy of the whole cache per layer (measured: 4.5 ms a layer for a
        # 16 MB cache on a CPU, growing with max_seq_len), while an index_put_ on the input itself stays in place.
        index = (c.layers[layer], rows, heads, where)  # broadcast to (rows, H_kv)
        c.k.index_put_(index, k[:, 0].to(c.k.dtype))
        c.v.index_put_(index, v[:, 0].to(c.v.dtype))
        return c.k[layer, :self.rows, :, :self.read_length], c.v[layer, :self.rows, :, :self.read_length]

    def previous_embeddings(self, slots, n_embd: int, dtype: torch.dtype) -> torch.Tensor:
        """The rows' last token embeddings (rows, n_embd), for a model with smear (see KVCache)."""
        return self.cache.previous_embeddings(slice(0, self.rows), n_embd, dtype)

    def remember_embeddings(self, slots, emb: torch.Tensor) -> None:
        """Keep emb (rows, n_embd) as the rows' last embeddings, for the active rows only."""
        held = self.cache.previous_embeddings(slice(0, self.rows), emb.size(-1), emb.dtype)
        kept = torch.where(self.active[:, None], emb.to(held.dtype), held)
        self.cache.remember_embeddings(slice(0, self.rows), kept)

    def advance(self, slots, t: int) -> None:
        self.cache.pos[:self.rows] += self.active
