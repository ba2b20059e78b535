"""A tiny decoder-only transformer (RoPE, grouped-query attention, SwiGLU)
whose attention reads and writes a paged KV cache the way vLLM lays it out
for its NIXL connector: per layer a K and a V tensor in HND order
[num_blocks, num_kv_heads, block_size, head_dim], and a block table per
request. Tensor parallelism splits heads (and the MLP's hidden units) across
ranks; the partial sums of the output projections are all-reduced with
torch.distributed (gloo). Weights come from a fixed seed, so every process
builds the same model."""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Config:
    vocab: int = 256
    dim: int = 128
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 16
    n_layers: int = 2
    ffn: int = 256
    block_size: int = 16
    rope_theta: float = 10000.0
    seed: int = 1234


def full_weights(cfg: Config) -> dict:
    """All of the model's weights (float32), drawn from cfg.seed."""
    g = torch.Generator().manual_seed(cfg.seed)

    def w(*shape, scale):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * scale

    d, hd = cfg.dim, cfg.head_dim
    out = {"embed": w(cfg.vocab, d, scale=1.0),
           "lm_head": w(cfg.vocab, d, scale=d ** -0.5),
           "norm": 1.0 + w(d, scale=0.1)}
    for layer in range(cfg.n_layers):
        out[f"{layer}.norm1"] = 1.0 + w(d, scale=0.1)
        out[f"{layer}.wq"] = w(cfg.n_heads * hd, d, scale=d ** -0.5)
        out[f"{layer}.wk"] = w(cfg.n_kv_heads * hd, d, scale=d ** -0.5)
        out[f"{layer}.wv"] = w(cfg.n_kv_heads * hd, d, scale=d ** -0.5)
        out[f"{layer}.wo"] = w(d, cfg.n_heads * hd, scale=(cfg.n_heads * hd) ** -0.5)
        out[f"{layer}.norm2"] = 1.0 + w(d, scale=0.1)
        out[f"{layer}.w1"] = w(cfg.ffn, d, scale=d ** -0.5)
        out[f"{layer}.w3"] = w(cfg.ffn, d, scale=d ** -0.5)
        out[f"{layer}.w2"] = w(d, cfg.ffn, scale=cfg.ffn ** -0.5)
    return out


class NoHooks:
    """The per-layer points where a KV connector steps in (vLLM's
    wait_for_layer_load before attention reads the cache, save_kv_layer
    after attention wrote it)."""

    def wait_for_layer_load(self, layer: int) -> None:
        pass

    def save_kv_layer(self, layer: int) -> None:
        pass


class Model:
    """Rank `rank` of a `tp`-way tensor-parallel shard of the model."""

    def __init__(self, cfg: Config, rank: int = 0, tp: int = 1, group=None):
        assert cfg.n_heads % tp == 0 and cfg.n_kv_heads % tp == 0 and cfg.ffn % tp == 0
        self.cfg, self.rank, self.tp, self.group = cfg, rank, tp, group
        self.heads = cfg.n_heads // tp
        self.kv_heads = cfg.n_kv_heads // tp
        hd = cfg.head_dim
        w = full_weights(cfg)
        q = slice(rank * self.heads * hd, (rank + 1) * self.heads * hd)
        kv = slice(rank * self.kv_heads * hd, (rank + 1) * self.kv_heads * hd)
        f = slice(rank * cfg.ffn // tp, (rank + 1) * cfg.ffn // tp)
        self.w = {"embed": w["embed"], "lm_head": w["lm_head"], "norm": w["norm"]}
        for layer in range(cfg.n_layers):
            p = f"{layer}."
            self.w[p + "norm1"] = w[p + "norm1"]
            self.w[p + "norm2"] = w[p + "norm2"]
            self.w[p + "wq"] = w[p + "wq"][q].contiguous()
            self.w[p + "wk"] = w[p + "wk"][kv].contiguous()
            self.w[p + "wv"] = w[p + "wv"][kv].contiguous()
            self.w[p + "wo"] = w[p + "wo"][:, q].contiguous()
            self.w[p + "w1"] = w[p + "w1"][f].contiguous()
            self.w[p + "w3"] = w[p + "w3"][f].contiguous()
            self.w[p + "w2"] = w[p + "w2"][:, f].contiguous()
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.inv_freq = inv

    def kv_cache(self, num_blocks: int) -> list:
        """Per layer (K, V), each [num_blocks, kv_heads, block_size, head_dim], zeroed."""
        c = self.cfg
        shape = (num_blocks, self.kv_heads, c.block_size, c.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(c.n_layers)]

    def _reduce(self, x):
        if self.tp > 1:
            dist.all_reduce(x, group=self.group)
        return x

    @staticmethod
    def _rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def _rope(self, x, pos):  # x [T, heads, hd]
        ang = pos[:, None].float() * self.inv_freq[None, :]  # [T, hd/2]
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    @torch.no_grad()
    def forward(self, tokens: list, start: int, block_table: list, kv: list, hooks=None):
        """Runs tokens at positions start.. through the model, writing their
        K and V into the cache slots the block table gives and attending over
        positions 0..start+len(tokens)-1 read through the block table.
        Returns the logits of the last token (float32 [vocab])."""
        hooks = hooks or NoHooks()
        c, hd, bs = self.cfg, self.cfg.head_dim, self.cfg.block_size
        T = len(tokens)
        n = start + T
        pos = torch.arange(start, n)
        x = self.w["embed"][torch.tensor(tokens)]
        blocks = torch.tensor([block_table[p // bs] for p in range(start, n)])
        offsets = pos % bs
        nb = (n + bs - 1) // bs
        ids = torch.tensor(block_table[:nb])
        allowed = torch.arange(n)[None, :] <= pos[:, None]  # [T, n] causal
        group = self.heads // self.kv_heads
        for layer in range(c.n_layers):
            p = f"{layer}."
            h = self._rms(x, self.w[p + "norm1"])
            q = self._rope((h @ self.w[p + "wq"].T).view(T, self.heads, hd), pos)
            k = self._rope((h @ self.w[p + "wk"].T).view(T, self.kv_heads, hd), pos)
            v = (h @ self.w[p + "wv"].T).view(T, self.kv_heads, hd)
            hooks.wait_for_layer_load(layer)
            K, V = kv[layer]
            K[blocks, :, offsets, :] = k
            V[blocks, :, offsets, :] = v
            hooks.save_kv_layer(layer)
            # Gather the context through the block table: [kv_heads, n, hd].
            Kc = K[ids].permute(1, 0, 2, 3).reshape(self.kv_heads, nb * bs, hd)[:, :n]
            Vc = V[ids].permute(1, 0, 2, 3).reshape(self.kv_heads, nb * bs, hd)[:, :n]
            Kc = Kc.repeat_interleave(group, dim=0)
            Vc = Vc.repeat_interleave(group, dim=0)
            scores = (q.permute(1, 0, 2) @ Kc.transpose(1, 2)) / math.sqrt(hd)  # [H, T, n]
            scores = scores.masked_fill(~allowed[None], float("-inf"))
            att = (scores.softmax(-1) @ Vc).permute(1, 0, 2).reshape(T, self.heads * hd)
            x = x + self._reduce(att @ self.w[p + "wo"].T)
            h = self._rms(x, self.w[p + "norm2"])
            m = torch.nn.functional.silu(h @ self.w[p + "w1"].T) * (h @ self.w[p + "w3"].T)
            x = x + self._reduce(m @ self.w[p + "w2"].T)
        x = self._rms(x[-1], self.w["norm"])
        return x @ self.w["lm_head"].T
