"""A KV cache whose index is the layout's position: ``[raw | v_1 ... v_i | text window]``.

Buffers are ``(rows + 1, H_kv, capacity, head_dim)`` per layer, allocated once at the
memory limit, so their addresses never change and a decode step can be captured as a CUDA
graph. The extra last row is scratch: padding rows of a captured step write there. Each row's
live length lives on the device (:attr:`length`, read and advanced inside the decode step)
and, for free, on the host (:attr:`host_length`: the row manager, :mod:`.kv_rows`, counts the
entries fed), so no step needs to read a device value back.

Before every forward the runner tells the cache which rows take part and at which cache
indices the new tokens' K/V go (:meth:`prepare`); the attention layers then call :meth:`update`
as on any transformers cache and get back the rows' first ``span`` entries. Everything below
a row's live length is alive, so the attention mask is plain causal over cache indices:
a boolean ``(b, 1, T, span)`` built by broadcasting the write indices against ``arange(span)``
(no float mask). Compressing a chunk writes its visual tokens after the window, then
:meth:`evict` moves them to where the window began: keys carry the rotation of their
position, which does not change, so nothing is re-rotated.
"""

from __future__ import annotations

from typing import Sequence

import torch


class CompressedKVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (batch + 1, n_kv_heads, capacity, head_dim)  # + the scratch row
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.rows, self.capacity, self.scratch = batch, capacity, batch
        self.length = torch.zeros(batch + 1, dtype=torch.long, device=device)  # live entries per row
        self.host_length = [0] * batch  # the same, as the engine counts them (never read from the device)
        self._sel: slice | torch.Tensor = slice(0, 0)
        self._write: torch.Tensor | None = None
        self._write_rows: torch.Tensor | None = None
        self._span = 0

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def bytes_per_token(self) -> int:
        k = self.keys[0]
        return 2 * len(self.keys) * k.shape[1] * k.shape[3] * k.element_size()

    @property
    def bytes_allocated(self) -> int:
        return self.rows * self.capacity * self.bytes_per_token

    def prepare(self, rows: Sequence[int] | slice, write_BT: torch.Tensor, span: int,
                write_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Set up the next forward: rows (a slice, or host row numbers), the cache index of every new
        token ``(b, T)`` on the device, and how many entries the layers read back; ``write_rows``
        (device, ``(b,)`` per row or ``(b, T)`` per token) redirects writes to other rows (the decode
        step sends idle rows to scratch, a batched prefill its padding).
        Returns the attention mask ``(b, 1, T, span)``, bool, causal over cache indices."""
        if isinstance(rows, slice):
            self._sel = rows
        else:  # contiguous rows are read as a view; an index tensor would copy every layer's cache
            r0, n = rows[0], len(rows)
            contiguous = list(rows) == list(range(r0, r0 + n))
            self._sel = slice(r0, r0 + n) if contiguous else torch.tensor(list(rows), device=self.device)
        if write_rows is None:
            sel = self._sel
            write_rows = torch.arange(sel.start, sel.stop, device=self.device) if isinstance(sel, slice) else sel
        self._write_rows = write_rows if write_rows.dim() == 2 else write_rows[:, None]
        self._write, self._span = write_BT, span
        keys = torch.arange(span, device=self.device)
        return (keys[None, None, None, :] <= write_BT[:, None, :, None])

    def update(self, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by each attention layer: store the new K/V, return the rows' caches up to ``span``."""
        sel, write, idx = self._sel, self._write, self._write_rows
        # advanced indices in dims 0 and 2 put (b, T) first: values go in as (b, T, H, d)
        self.keys[layer_idx][idx, :, write] = k_BHTd.transpose(1, 2)
        self.values[layer_idx][idx, :, write] = v_BHTd.transpose(1, 2)
        return self.keys[layer_idx][sel, :, : self._span], self.values[layer_idx][sel, :, : self._span]

    def evict(self, row: int, text_start: int, visual_start: int, n_visual: int) -> None:
        """Drop a compressed chunk's text ``[text_start, visual_start)``: its ``n_visual`` entries
        move to where the text began, and the row's length ends after them."""
        if visual_start != text_start:
            for buf in (*self.keys, *self.values):
                buf[row, :, text_start : text_start + n_visual] = buf[row, :, visual_start : visual_start + n_visual].clone()
        self.set_length(row, text_start + n_visual)

    def set_length(self, row: int, n: int) -> None:
        self.host_length[row] = n
        self.length[row] = n  # a host-to-device write, no read back

    def advanced(self, rows: Sequence[int], n: int) -> None:
        """Record on the host that ``rows`` grew by ``n`` (the device copy was advanced in the step)."""
        for r in rows:
            self.host_length[r] += n

    # transformers' models may ask these of a cache; positions and masks are always given explicitly
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.host_length)

    def __len__(self) -> int:
        return len(self.keys)
