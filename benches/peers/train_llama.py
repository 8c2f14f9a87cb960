#!/usr/bin/env python3
"""PyTorch eager side of `cargo xtask bench train` (issue 9).

Trains the same Llama as `crates/eg-kernel/examples/train_speed.rs` (RMSNorm, half-split RoPE,
SwiGLU MLP, grouped-query attention when kv_heads < heads, tied embeddings, next-token cross
entropy) with `torch.optim.AdamW` in f32 on the CPU, and prints one line

    RESULT key=value key=value ...

that xtask parses. Modes:

    train_llama.py train --hidden H --inter I --layers L --heads N --kv-heads K --vocab V
                         --seq S --batch B --steps T --warmup W --threads P
    train_llama.py matmul --n 2048 --threads P

Attention is `torch.nn.functional.scaled_dot_product_attention(is_causal=True)`, the default
of Hugging Face `transformers` (attn_implementation="sdpa"). Nothing here is compiled
(`torch.compile` is not used): this is PyTorch eager as users run it.
"""

import argparse
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def peak_rss_bytes():
    """VmHWM of this process (peak resident set), in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


def rope_tables(seq, head_dim, theta):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(seq, dtype=torch.float32)
    ang = torch.outer(t, inv)  # [seq, hd/2]
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    # x: [b, n, t, hd], half-split layout (Hugging Face Llama's rotate_half).
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Block(nn.Module):
    def __init__(self, h, inter, heads, kv_heads, eps):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, h // heads
        self.input_layernorm = RMSNorm(h, eps)
        self.q_proj = nn.Linear(h, heads * self.hd, bias=False)
        self.k_proj = nn.Linear(h, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(h, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(heads * self.hd, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        hs = self.input_layernorm(x)
        q = self.q_proj(hs).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(hs).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(hs).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        gqa = self.kv_heads != self.heads
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        a = a.transpose(1, 2).reshape(b, t, self.heads * self.hd)
        x = x + self.o_proj(a)
        hs = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(hs)) * self.up_proj(hs))


class Llama(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab, a.hidden)
        self.layers = nn.ModuleList(
            Block(a.hidden, a.inter, a.heads, a.kv_heads, 1e-5) for _ in range(a.layers)
        )
        self.norm = RMSNorm(a.hidden, 1e-5)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
        cos, sin = rope_tables(a.seq, a.hidden // a.heads, 10000.0)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        x = self.norm(x)
        return x @ self.embed_tokens.weight.t()  # tied lm_head


def train(a):
    torch.manual_seed(1)
    model = Llama(a)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    g = torch.Generator().manual_seed(7)
    batches = [
        torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g) for _ in range(4)
    ]
    fwd, bwd, upd, total, losses = [], [], [], [], []
    cpu0 = None
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            cpu0 = cpu_seconds()
        ids = batches[step % len(batches)]
        t0 = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        losses.append(loss.item())
        if step >= a.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            upd.append(t3 - t2)
            total.append(t3 - t0)
    cpu = cpu_seconds() - cpu0
    tokens = a.batch * a.seq
    med = statistics.median
    print(
        "RESULT side=pytorch"
        f" torch={torch.__version__} threads={torch.get_num_threads()}"
        f" params={n_params} tokens_per_step={tokens} steps={a.steps}"
        f" step_s={med(total):.6f} fwd_s={med(fwd):.6f} bwd_s={med(bwd):.6f}"
        f" opt_s={med(upd):.6f} mean_step_s={sum(total) / len(total):.6f}"
        f" min_step_s={min(total):.6f}"
        f" tokens_per_s={tokens / med(total):.3f}"
        f" cpu_s_per_step={cpu / a.steps:.6f}"
        f" peak_rss={peak_rss_bytes()} first_loss={losses[0]:.5f} last_loss={losses[-1]:.5f}"
    )


def matmul(a):
    n = a.n
    x = torch.randn(n, n)
    y = torch.randn(n, n)
    torch.mm(x, y)
    best = math.inf
    for _ in range(a.reps):
        t0 = time.perf_counter()
        torch.mm(x, y)
        best = min(best, time.perf_counter() - t0)
    print(
        f"RESULT side=pytorch threads={torch.get_num_threads()} n={n}"
        f" best_s={best:.6f} gflops={2 * n**3 / best / 1e9:.3f}"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["train", "matmul"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if a.mode == "train":
        train(a)
    else:
        matmul(a)


if __name__ == "__main__":
    sys.exit(main())
