"""The demo's byte-level transformer language model, the one training recipe every run gets, and bits per byte."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch_pretrain_update import KDLoss, freeze, partial_optimizer, sequence_scores
from torch_pretrain_update._rng import epoch_generator
from torch_pretrain_update.demo.lm.config import LMConfig

__all__ = ["ByteLM", "Encoded", "bits_per_byte", "encode", "forward_chunks", "lower_part", "train_lm"]

VOCAB = 256  # bytes
_EVAL_BATCH = 64


@dataclass
class Encoded:
    """Chunks as model inputs: ``inputs[i, t]`` predicts ``targets[i, t]`` (the next byte) where ``mask[i, t]``
    (the positions of a short chunk past its end are padding: never trained on, never scored)."""

    inputs: torch.Tensor  # (N, L) int64
    targets: torch.Tensor  # (N, L) int64
    mask: torch.Tensor  # (N, L) bool

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, index: torch.Tensor) -> Encoded:
        return Encoded(self.inputs[index], self.targets[index], self.mask[index])


def encode(chunks: list[bytes], seq_len: int) -> Encoded:
    """Chunks of 2 to ``seq_len + 1`` bytes as an :class:`Encoded` batch, right-padded."""
    buf = np.zeros((len(chunks), seq_len + 1), dtype=np.uint8)
    lengths = np.zeros(len(chunks), dtype=np.int64)
    for i, c in enumerate(chunks):
        buf[i, : len(c)] = np.frombuffer(c, dtype=np.uint8)
        lengths[i] = len(c)
    ids = torch.from_numpy(buf).long()
    mask = torch.arange(seq_len) < torch.from_numpy(lengths - 1)[:, None]
    return Encoded(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), mask)


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # causal: a real position never attends to the right padding after it
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """A small GPT-style byte-level language model: token and position embeddings, ``layers`` blocks, a final
    norm and an (untied) output layer over the 256 byte values."""

    def __init__(self, seq_len: int, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The final normalised hidden states, (B, L, d_model)."""
        h = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))


def lower_part(cfg: LMConfig) -> tuple[list[str], list[str]]:
    """Parameter patterns of the partial update: (frozen: embeddings and the lower ``cfg.frozen_blocks``
    blocks; trainable: the blocks above, the final norm and the output layer)."""
    frozen = ["tok_emb.*", "pos_emb.*"] + [f"blocks.{i}.*" for i in range(cfg.frozen_blocks)]
    trainable = [f"blocks.{i}.*" for i in range(cfg.frozen_blocks, cfg.layers)] + ["ln_f.*", "head.*"]
    return frozen, trainable


def forward_chunks(model: ByteLM, data: Encoded, fn: Callable[[torch.Tensor, slice], None]) -> None:
    """Call ``fn(hidden_states, rows)`` for each eval-sized chunk of ``data`` (eval mode, no gradients)."""
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data), _EVAL_BATCH):
            rows = slice(start, start + _EVAL_BATCH)
            fn(model.hidden(data.inputs[rows]), rows)


def bits_per_byte(model: ByteLM, data: Encoded) -> float:
    """Mean negative log2-likelihood per predicted byte over every real position of ``data``."""
    total = [0.0]

    def add(h: torch.Tensor, rows: slice) -> None:
        nll = sequence_scores(model.head(h), data.mask[rows], score="nll", reduce="sum", targets=data.targets[rows])
        total[0] += float(nll.double().sum())

    forward_chunks(model, data, add)
    return total[0] / int(data.mask.sum()) / math.log(2.0)


def _schedule(steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first 10% of the steps, then cosine decay to 10% of the learning rate."""
    warm = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return factor


def train_lm(
    model: ByteLM,
    data: Encoded,
    *,
    steps: int,
    lr: float,
    cfg: LMConfig,
    seed: int,
    stream: int,
    method: str = "finetune",
    teacher: Optional[ByteLM] = None,
    on_step: Optional[Callable[[], None]] = None,
) -> None:
    """Train ``model`` in place for ``steps`` batches of ``cfg.batch_size`` chunks (a fresh shuffle per pass,
    ``epoch_generator(seed, pass, stream)``), Adam with :func:`_schedule`.

    ``method``: ``"finetune"`` (every parameter, cross-entropy on the real positions), ``"partial"`` (embeddings
    and lower blocks frozen with :func:`~torch_pretrain_update.freeze` and left out of the optimizer by
    :func:`~torch_pretrain_update.partial_optimizer`) or ``"kd"`` (every parameter, token-level
    :class:`~torch_pretrain_update.KDLoss` against ``teacher``'s logits with the padding mask).
    """
    if method == "partial":
        frozen, trainable = lower_part(cfg)
        freeze(model, frozen)
        opt = partial_optimizer(model, torch.optim.Adam, trainable=trainable, lr=lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))
    kd: Optional[KDLoss] = None
    teacher_logits = torch.empty(0)
    if method == "kd":
        if teacher is None:
            raise ValueError("method='kd' needs a teacher")
        kd = KDLoss(temperature=cfg.kd_temperature, alpha=cfg.kd_alpha)
        parts: list[torch.Tensor] = []
        forward_chunks(teacher, data, lambda h, rows: parts.append(teacher.head(h)))
        teacher_logits = torch.cat(parts)  # fixed teacher: one forward pass, not one per step
    n, step, epoch = len(data), 0, 0
    while step < steps:
        model.train()
        order = torch.randperm(n, generator=epoch_generator(seed, epoch, stream))
        for start in range(0, n, cfg.batch_size):
            b = order[start : start + cfg.batch_size]
            logits = model(data.inputs[b])
            m = data.mask[b]
            if kd is not None:
                loss = kd(logits, teacher_logits[b], data.targets[b], mask=m)
            else:
                loss = F.cross_entropy(logits[m], data.targets[b][m])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if on_step is not None:
                on_step()
            if step == steps:
                break
        epoch += 1
