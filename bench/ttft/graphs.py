"""A decoder's prefill with the work between attentions replayed as CUDA graphs, attention run eagerly.

vLLM runs a step this way: its piecewise CUDA graphs cover the model split at attention, and a step's tokens are
padded up to a captured size, so the host launches one graph between two attentions instead of the dozens of
kernels of the norms, projections, rotary embedding and MLP. Attention stays outside the graphs, and with it the
connector's ``wait_for_layer_load`` and ``save_kv_layer``. Run eagerly, this bench's forward of 256 new tokens is
bound by the host's kernel launches, so a TTFT measured with it counts host time that vLLM's forward does not
spend.

`GraphedPrefill` wraps a `DecoderModel` with the same ``prefill`` call. For ``n`` new tokens it takes the
smallest captured size of at least ``n`` and replays that size's graphs: one before the first attention (embedding
and layer 0 up to its attention), one between each two attentions (layer i's output projection and MLP, layer
i + 1 up to its attention) and one after the last. Attention reads and writes only the ``n`` real rows; the padded
rows carry stale but finite values through the row-wise work and are never read. Longer prefills run eagerly
(vLLM runs steps longer than its largest captured size without graphs too).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import model as decoder

#: Token counts captured (a prefill of n tokens replays the smallest one >= n; longer ones run eagerly).
GRAPH_SIZES = (16, 32, 64, 128, 256, 384, 512)


class _Uncaptured:
    """A piece run as it is where its graph would be replayed (`GraphedPrefill` with ``capture`` False)."""

    def __init__(self, run: Callable[[], None]) -> None:
        self.replay = run


def padded_size(sizes: Sequence[int], num_tokens: int) -> int | None:
    """The smallest of ``sizes`` that holds ``num_tokens`` tokens, None when none does."""
    return min((size for size in sizes if size >= num_tokens), default=None)


class GraphedPrefill:
    """`DecoderModel.prefill` with CUDA graphs between attentions (see the module docstring)."""

    def __init__(self, model: decoder.DecoderModel, sizes: Sequence[int] = GRAPH_SIZES, capture: bool = True) -> None:
        """Capture ``model``'s graphs for every size of ``sizes``; ``capture`` False runs the same pieces over the
        same padded buffers without capturing them (on any device: what the CPU tests check)."""
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}")
        if not sizes or min(sizes) < 1:
            raise ValueError(f"graph sizes must be positive token counts, got {list(sizes)}")
        self.model = model
        self.device = model.device
        self.shape = model.shape
        self.sizes = tuple(sorted(set(sizes)))
        s, largest = model.shape, self.sizes[-1]

        def buffer(*dims: int, dtype: torch.dtype = model.dtype) -> torch.Tensor:
            return torch.zeros(*dims, dtype=dtype, device=model.device)

        self._tokens = buffer(largest, dtype=torch.long)
        self._cos, self._sin = buffer(largest, 1, s.head_dim), buffer(largest, 1, s.head_dim)
        self._x = buffer(largest, s.hidden)
        self._q = buffer(largest, s.num_heads, s.head_dim)
        self._k, self._v = buffer(largest, s.num_kv_heads, s.head_dim), buffer(largest, s.num_kv_heads, s.head_dim)
        self._attn = buffer(largest, s.num_heads, s.head_dim)
        self._graphs = {size: self._capture(size) if capture else [_Uncaptured(run) for run in self._pieces(size)]
                        for size in self.sizes}

    def padded_size(self, num_tokens: int) -> int | None:
        """The captured size a prefill of ``num_tokens`` replays, None when it runs eagerly."""
        return padded_size(self.sizes, num_tokens)

    def prefill(self, tokens: torch.Tensor, kv_caches: list[torch.Tensor], block_table: torch.Tensor,
                num_cached: int, before_attention: Callable[[int], None] | None = None,
                after_attention: Callable[[int], None] | None = None) -> torch.Tensor:
        """`DecoderModel.prefill`, through the graphs of the padded size where one was captured."""
        n = tokens.shape[0]
        size = self.padded_size(n)
        if size is None:
            return self.model.prefill(tokens, kv_caches, block_table, num_cached, before_attention, after_attention)
        graphs = self._graphs[size]
        self._tokens[:n].copy_(tokens)
        cos, sin = self.model.rope_tables(num_cached, size)
        self._cos[:size].copy_(cos)
        self._sin[:size].copy_(sin)
        mask = decoder.causal_mask(n, num_cached, self.device) if num_cached else None
        for index, cache in enumerate(kv_caches):
            graphs[index].replay()
            if before_attention is not None:
                before_attention(index)
            attn = decoder.paged_attention(self._q[:n], self._k[:n], self._v[:n], cache, block_table, num_cached,
                                           mask)
            if after_attention is not None:
                after_attention(index)
            self._attn[:n].copy_(attn)
        graphs[-1].replay()
        return self.model.logits(self._x[n - 1:n])

    def _pieces(self, size: int) -> list[Callable[[], None]]:
        """The work between attentions for ``size`` tokens, reading and writing the static buffers: piece 0 embeds
        and runs layer 0 up to its attention, piece i finishes layer i - 1 and runs layer i up to its attention,
        the last piece finishes the last layer."""
        m, num_layers = self.model, self.shape.num_layers
        tokens, cos, sin = self._tokens[:size], self._cos[:size], self._sin[:size]
        x, q, k, v, attn = self._x[:size], self._q[:size], self._k[:size], self._v[:size], self._attn[:size]

        def piece(index: int) -> Callable[[], None]:
            def run() -> None:
                h = m.embed[tokens] if index == 0 else m.layer_out(index - 1, x, attn)
                if index < num_layers:
                    for buf, value in zip((q, k, v), m.layer_in(index, h, cos, sin)):
                        buf.copy_(value)
                x.copy_(h)
            return run

        return [piece(index) for index in range(num_layers + 1)]

    def _capture(self, size: int) -> list[torch.cuda.CUDAGraph]:
        """Warm ``size``'s pieces up on a side stream, then capture one graph each, all in one memory pool (they
        are always replayed in the order captured, one at a time), and replay them once (a graph's first launch
        uploads it). Only this thread's CUDA calls are held to the capture's rules: kvbm's threads may query their
        events meanwhile."""
        pieces = self._pieces(size)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                for run in pieces:
                    run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        for run in pieces:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                run()
            graphs.append(graph)
        for graph in graphs:
            graph.replay()
        return graphs
