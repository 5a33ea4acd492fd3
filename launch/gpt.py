"""A small GPT and a deterministic synthetic language it can learn within a minute on CPU.

The language is a fixed sparse Markov chain: every token has ``branching`` possible successors
(drawn once from ``language_seed``), so the best achievable loss is ln(branching) against
ln(vocab) for a model that knows nothing. The global batch of step ``s`` is a pure function of
(``data_seed``, ``s``) and is split across ranks by index, so the data stream does not depend on
the number of ranks and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 64
    context: int = 32
    width: int = 64
    layers: int = 2
    heads: int = 4


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class GPTStage(nn.Module):
    """Pipeline stage ``stage`` of ``num_stages`` of the GPT: its share of the blocks, plus the
    embeddings on the first stage and the final norm and head on the last. Parameters keep the full
    model's names (``blocks.1.qkv.weight``), so stages' checkpoints never collide and a pipeline
    checkpoint has the same keys as the whole model's."""

    def __init__(self, cfg: GPTConfig, stage: int, num_stages: int) -> None:
        super().__init__()
        if not 0 < num_stages <= cfg.layers:
            raise ValueError(
                f"num_stages must be in [1, {cfg.layers}] (one block per stage at least), got {num_stages}."
            )
        full = GPT(cfg)  # built whole from the same seed on every rank, then cut
        per = cfg.layers // num_stages
        mine = range(stage * per, cfg.layers if stage == num_stages - 1 else (stage + 1) * per)
        self.first, self.last = stage == 0, stage == num_stages - 1
        if self.first:
            self.tok, self.pos = full.tok, full.pos
        self.blocks = nn.ModuleDict({str(i): full.blocks[i] for i in mine})
        if self.last:
            self.ln, self.head = full.ln, full.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks.values():
            x = block(x)
        return self.head(self.ln(x)) if self.last else x


class MarkovLanguage:
    """Token sequences from a fixed sparse transition table (the "grammar")."""

    def __init__(self, vocab: int, branching: int = 2, language_seed: int = 1234) -> None:
        gen = torch.Generator().manual_seed(language_seed)
        self.vocab = vocab
        self.successors = torch.stack(
            [torch.randperm(vocab, generator=gen)[:branching] for _ in range(vocab)]
        )
        self.best_loss = math.log(branching)

    def global_batch(self, step: int, batch: int, length: int, data_seed: int) -> torch.Tensor:
        """(batch, length + 1) tokens for ``step``: identical for every world size."""
        gen = torch.Generator().manual_seed(data_seed * 1_000_003 + step)
        tokens = torch.empty(batch, length + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(self.vocab, (batch,), generator=gen)
        choice = torch.randint(self.successors.shape[1], (batch, length), generator=gen)
        for t in range(length):
            tokens[:, t + 1] = self.successors[tokens[:, t], choice[:, t]]
        return tokens

    def local_batch(
        self, step: int, batch: int, length: int, data_seed: int, rank: int, num_shards: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This data-parallel shard's (inputs, targets) of the global batch."""
        if batch % num_shards:
            raise ValueError(f"--batch ({batch}) must be divisible by the data-parallel size ({num_shards}).")
        per = batch // num_shards
        tokens = self.global_batch(step, batch, length, data_seed)[rank * per : (rank + 1) * per]
        return tokens[:, :-1], tokens[:, 1:]
