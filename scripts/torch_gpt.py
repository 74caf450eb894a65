#!/usr/bin/env python3
"""The GPT of examples/gpt_model.rs in plain PyTorch, CPU, 2 threads: tokens/s.

Run by hand, not in CI (it needs torch: `python3 -m venv /tmp/torch && /tmp/torch/bin/pip
install torch`), and compare with `cargo bench -p relume --bench gpt`:

    /tmp/torch/bin/python scripts/torch_gpt.py            # BENCH_STEPS=20 by default

Same configuration as the bench: block 64, d_model 128, 4 layers, 4 heads, batch 32,
tied head, no dropout, windows of the KJV corpus on a stride-64 grid in a shuffled
order, AdamW (lr 3e-3, betas (0.9, 0.99), weight decay 0.1) with 5% linear warmup
from 1% then a cosine to 10%, gradient clipping at norm 1, f32. Attention is written
out (softmax of masked scores) as in relume, not F.scaled_dot_product_attention;
pass --sdpa to use PyTorch's fused kernel instead.
"""

import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK, D, LAYERS, HEADS, BATCH = 64, 128, 4, 4, 32
LR, WD = 3e-3, 0.1


class Block(nn.Module):
    def __init__(self, sdpa):
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 4 * D)
        self.out = nn.Linear(4 * D, D)
        self.sdpa = sdpa
        self.register_buffer("mask", torch.full((BLOCK, BLOCK), float("-inf")).triu(1))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, HEADS, d // HEADS).transpose(1, 2) for z in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = q @ k.transpose(-2, -1) / math.sqrt(d // HEADS) + self.mask[:t, :t]
            y = att.softmax(dim=-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, vocab, sdpa):
        super().__init__()
        self.wte = nn.Embedding(vocab, D)
        self.wpe = nn.Embedding(BLOCK, D)
        self.blocks = nn.ModuleList(Block(sdpa) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D)
        resid = 0.02 / math.sqrt(2 * LAYERS)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln" in name:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, resid if name.endswith("proj.weight") or name.endswith("out.weight") else 0.02)

    def forward(self, idx, y):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    steps = int(os.environ.get("BENCH_STEPS", "20"))
    here = os.path.dirname(os.path.abspath(__file__))
    text = open(os.path.join(here, "..", "examples", "data", "kjv.txt"), "rb").read()
    vocab = sorted(set(text))
    index = {b: i for i, b in enumerate(vocab)}
    ids = torch.tensor([index[b] for b in text[: len(text) - round(len(text) * 0.1)]])
    n_windows = (len(ids) - BLOCK - 1) // BLOCK + 1
    model = Gpt(len(vocab), "--sdpa" in sys.argv)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=WD)
    warmup = max(steps // 20, 1)

    def lr_at(step):
        if step < warmup:
            return LR * (0.01 + 0.99 * step / warmup)
        t = (step - warmup) / max(steps - warmup, 1)
        return LR / 10 + (LR - LR / 10) * (1 + math.cos(math.pi * t)) / 2

    order = torch.randperm(n_windows)

    def run(n):
        t0 = time.perf_counter()
        for step in range(n):
            starts = order[(step * BATCH) % (n_windows - BATCH):][:BATCH] * BLOCK
            w = torch.stack([ids[s : s + BLOCK + 1] for s in starts.tolist()])
            loss = model(w[:, :-1], w[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.step()
            loss.item()
        return time.perf_counter() - t0

    run(2)  # warm-up, untimed
    secs = run(steps)
    tokens = steps * BATCH * BLOCK
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sdpa={'--sdpa' in sys.argv}")
    print(f"pytorch   {tokens / secs:>9.0f} tokens/s ({secs * 1e3 / steps:.1f} ms/step)")


if __name__ == "__main__":
    main()
