"""A KV cache whose index is the layout's position: ``[raw | v_1 ... v_i | text window]``.

Buffers are ``(B, H_kv, capacity, head_dim)`` per layer, grown (doubling) up to a
limit as rows need more room, so a compressed cache costs compressed memory; each
row has a live length. The engine tells the cache, before every forward, which
rows take part and at which cache indices the new tokens' K/V go
(:meth:`CompressedKVCache.prepare`); the attention layers then call
:meth:`update` as they would on any transformers cache. Everything below a
row's live length is alive, so the attention mask of every step is plain
causal over cache indices. Compressing a chunk writes its visual tokens after
the window, then :meth:`move` puts them where the window began: keys carry the
rotation of their position, which does not change, so nothing is re-rotated.
"""

from __future__ import annotations

import torch


class CompressedKVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", limit: int | None = None):
        self.limit = limit or capacity  # capacity grows on demand up to this many entries per row
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = torch.zeros(batch, dtype=torch.long)  # live entries per row (on CPU: read every step)
        self.capacity = capacity
        self._rows = self._write = None
        self._row_slice: slice | None = None
        self._span = 0

    @property
    def bytes_per_token(self) -> int:
        k = self.keys[0]
        return 2 * len(self.keys) * k.shape[1] * k.shape[3] * k.element_size()

    def grow(self, needed: int) -> None:
        """Make room for ``needed`` entries per row (doubling, up to ``limit``), keeping the contents."""
        assert needed <= self.limit, "the engine checks the limit before writing"
        if needed <= self.capacity:
            return
        new = min(self.limit, max(needed, 2 * self.capacity))
        for bufs in (self.keys, self.values):
            for i, old in enumerate(bufs):
                buf = old.new_zeros(old.shape[0], old.shape[1], new, old.shape[3])
                buf[:, :, : self.capacity] = old
                bufs[i] = buf
        self.capacity = new

    def prepare(self, rows: torch.Tensor, write_BT: torch.Tensor) -> torch.Tensor:
        """Set up the next forward; returns its allow-pattern ``(b, T, span)`` as bool."""
        self.grow(int(write_BT.max()) + 1)
        device = self.keys[0].device
        self._rows, self._write = rows.to(device), write_BT.to(device)
        self._span = int(write_BT.max()) + 1
        # contiguous rows can be read as a view; an index tensor would copy every layer's cache
        r0, n = int(rows[0]), len(rows)
        contiguous = bool(torch.equal(rows.cpu(), torch.arange(r0, r0 + n)))
        self._row_slice = slice(r0, r0 + n) if contiguous else None
        keys = torch.arange(self._span, device=device)
        return keys[None, None, :] <= self._write[:, :, None]  # causal over cache indices

    def update(self, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by each attention layer: store the new K/V, return the rows' caches up to ``span``."""
        rows, write = self._rows, self._write
        # advanced indices in dims 0 and 2 put (b, T) first: values go in as (b, T, H, d)
        self.keys[layer_idx][rows[:, None], :, write] = k_BHTd.transpose(1, 2)
        self.values[layer_idx][rows[:, None], :, write] = v_BHTd.transpose(1, 2)
        sel = self._row_slice if self._row_slice is not None else rows
        return self.keys[layer_idx][sel, :, : self._span], self.values[layer_idx][sel, :, : self._span]

    def move(self, row: int, src: int, dst: int, n: int) -> None:
        """Copy entries ``[src, src+n)`` to ``[dst, dst+n)`` of one row in every layer."""
        for buf in (*self.keys, *self.values):
            buf[row, :, dst : dst + n] = buf[row, :, src : src + n].clone()

    # transformers' models may ask these of a cache; positions and masks are always given explicitly
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.length.max())

    def __len__(self) -> int:
        return len(self.keys)
