"""A preallocated key/value cache with one slot per sequence, each slot at its own position (continuous batching),
`StaticRows`, the fixed-shape view of it that a decode step (nanochat/decode.py) appends to, and `PrefixCache`, the
keys and values of token prefixes kept for reuse after their request left its slot."""

import hashlib
from array import array
from collections import OrderedDict

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


class PrefixCache:
    """Keys and values of token prefixes seen before, kept in blocks of `block_size` positions for later requests
    that start with the same tokens (the next turn of a conversation, a shared system prompt, the n samples of
    one prompt): their slot gets the blocks copied in and prefills only the rest.

    k, v: (n_layer, n_kv_head, blocks, block_size, head_dim), allocated once beside a KVCache and in its dtype.
    A block is named by a digest of every token up to its end (a chain: the digest of the previous block plus
    this block's tokens), so it only ever matches the same whole prefix; sha256 rather than Python's hash, so that
    no crafted prompt can collide with another user's prefix and read their conversation. Only whole blocks are
    kept. When full, the least recently used block is evicted; a chain is touched from its end back to its first
    block, so a chain loses its tail before its head (vLLM's order: the head is what other prompts share).

    Copies rather than rows kept alive: the slots stay free for new requests the moment one finishes, the memory is
    bounded on its own (`blocks`), and a block shared by many prompts (a system prompt) is stored once.
    """

    def __init__(self, cache: KVCache, blocks: int, block_size: int = 16):
        if blocks < 1 or block_size < 1:
            raise ValueError(f"a prefix cache needs at least one block of at least one position, not {blocks} "
                             f"blocks of {block_size}")
        n_layer, _, n_kv_head, _, head_dim = cache.k.shape
        shape = (n_layer, n_kv_head, blocks, block_size, head_dim)
        self.k = torch.zeros(shape, device=cache.k.device, dtype=cache.k.dtype)
        self.v = torch.zeros(shape, device=cache.k.device, dtype=cache.k.dtype)
        self.cache, self.blocks, self.block_size = cache, blocks, block_size
        self.index: OrderedDict[bytes, int] = OrderedDict()  # digest → block, least recently used first
        self.free = list(range(blocks - 1, -1, -1))
        self.counts = {"lookups": 0, "hits": 0, "prompt_tokens": 0, "reused_tokens": 0, "stored_blocks": 0,
                       "evicted_blocks": 0}

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _digests(self, tokens: list[int], limit: int) -> list[bytes]:
        """The digests of the whole blocks among tokens[:limit], first block first."""
        digests, previous = [], b""
        for start in range(0, limit - self.block_size + 1, self.block_size):
            block = array("q", tokens[start:start + self.block_size]).tobytes()
            previous = hashlib.sha256(previous + block).digest()
            digests.append(previous)
        return digests

    def _touch(self, digests: list[bytes]) -> None:
        for digest in reversed(digests):  # the chain's head ends up the most recently used
            self.index.move_to_end(digest)

    def load(self, tokens: list[int], slot: int) -> int:
        """Copy the longest kept prefix of tokens[:-1] into `slot` (whose history is replaced) and return its
        length: a request always prefills at least its last token, whose logits give its first sample."""
        digests = self._digests(tokens, len(tokens) - 1)
        found = 0
        while found < len(digests) and digests[found] in self.index:
            found += 1
        self.counts["lookups"] += 1
        self.counts["prompt_tokens"] += len(tokens)
        n = found * self.block_size
        self.cache.pos[slot] = n
        if not found:
            return 0
        self._touch(digests[:found])
        blocks = torch.tensor([self.index[d] for d in digests[:found]], device=self.k.device)
        c = self.cache
        # (n_layer, n_kv_head, found, block_size, head_dim) → the row's first n positions
        c.k[:, slot, :, :n] = self.k[:, :, blocks].flatten(2, 3)
        c.v[:, slot, :, :n] = self.v[:, :, blocks].flatten(2, 3)
        self.counts["hits"] += 1
        self.counts["reused_tokens"] += n
        return n

    def store(self, tokens: list[int], slot: int) -> None:
        """Keep the whole blocks of `tokens`, which slot `slot` holds the keys and values of (its first
        len(tokens) positions). Blocks already kept are only touched; at most `blocks` are kept of one prefix."""
        digests = self._digests(tokens, min(len(tokens), self.blocks * self.block_size))
        kept = [d for d in digests if d in self.index]
        self._touch(kept)  # before evicting: a block of this chain is never the one evicted for it
        new, places = [], []
        for i, digest in enumerate(digests):
            if digest in self.index:
                continue
            if self.free:
                block = self.free.pop()
            else:
                _, block = self.index.popitem(last=False)
                self.counts["evicted_blocks"] += 1
            self.index[digest] = block
            new.append(block)
            places.append(i)
        self._touch(digests)
        if not new:
            return
        bs, c = self.block_size, self.cache
        blocks = torch.tensor(new, device=self.k.device)
        positions = (torch.tensor(places)[:, None] * bs + torch.arange(bs)[None, :]).flatten().to(self.k.device)
        # the row's positions of the new blocks (n_layer, n_kv_head, new * block_size, head_dim) → their blocks
        shape = (c.k.size(0), c.k.size(2), len(new), bs, c.k.size(-1))
        self.k[:, :, blocks] = c.k[:, slot].index_select(2, positions).view(shape)
        self.v[:, :, blocks] = c.v[:, slot].index_select(2, positions).view(shape)
        self.counts["stored_blocks"] += len(new)

    def stats(self) -> dict:
        """What /stats reports: reuse (hit_rate = prompt tokens whose keys and values were copied rather than
        computed / all prompt tokens looked up) and memory."""
        counts = dict(self.counts)
        prompt = counts["prompt_tokens"]
        return dict(counts, hit_rate=round(counts["reused_tokens"] / prompt, 4) if prompt else 0.0,
                    blocks=self.blocks, block_size=self.block_size, used_blocks=len(self.index),
                    bytes=self.nbytes, used_bytes=self.nbytes * len(self.index) // self.blocks)
