"""Next-token selection: penalties, banned tokens, then greedy or seeded sampling.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p
over one sort, then invert the CDF with a uniform draw from the sequence's own
generator, so a seeded request is reproducible whatever else is in the batch.
"""

from __future__ import annotations

import numpy as np
import torch

from llmserve.engine.sequence import Sequence


def apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    """In place on one row of logits: repetition (prompt + output), presence and frequency (output)."""
    if seq.token_counts is None:
        vocab = row.shape[0]
        seq.token_counts = torch.zeros(vocab, dtype=torch.float32)
        seq.seen_mask = torch.zeros(vocab, dtype=torch.bool)
        prompt = torch.tensor(seq.ids[:seq.num_prompt_tokens], dtype=torch.long)
        seq.seen_mask[prompt[prompt < vocab]] = True
        for token in seq.output_ids:
            seq.token_counts[token] += 1
            seq.seen_mask[token] = True
    params = seq.params
    if params.repetition_penalty != 1.0:
        seen = row[seq.seen_mask]
        row[seq.seen_mask] = torch.where(seen > 0, seen / params.repetition_penalty,
                                         seen * params.repetition_penalty)
    if params.frequency_penalty != 0.0:
        row -= params.frequency_penalty * seq.token_counts
    if params.presence_penalty != 0.0:
        row -= params.presence_penalty * (seq.token_counts > 0).float()


def banned_tokens(seq: Sequence) -> list[int]:
    """Tokens this step must not produce: EOS before min_tokens, and the last token of any bad word
    whose other tokens the output already ends with (TensorRT-LLM's bad_words semantics)."""
    banned: list[int] = []
    if seq.num_output_tokens < seq.params.min_tokens:
        banned.extend(seq.stop_ids)
    for word in seq.bad_word_ids:
        head = word[:-1]
        if not head or seq.ids[len(seq.ids) - len(head):] == head:
            banned.append(word[-1])
    return banned


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        vocab = logits.shape[-1]
        banned_rows: list[int] = []
        banned_cols: list[int] = []
        for i, seq in enumerate(seqs):
            if seq.params.has_penalties:
                apply_penalties(logits[i], seq)
            for token in banned_tokens(seq):
                if token < vocab:
                    banned_rows.append(i)
                    banned_cols.append(token)
        if banned_rows:  # one indexed write for the batch (EOS is banned in every row before min_tokens)
            logits[banned_rows, banned_cols] = float("-inf")
        tokens = logits.argmax(dim=-1).tolist()
        sampled = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        if sampled:
            for i, token in zip(sampled, self._sample(logits[sampled], [seqs[i] for i in sampled])):
                tokens[i] = token
        return tokens

    @staticmethod
    def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        vocab = logits.shape[-1]
        temperature = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)
        sorted_logits, order = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
        top_k = torch.tensor([s.params.top_k or vocab for s in seqs])
        rank = torch.arange(vocab)
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=probs.dtype)
        cdf = probs.cumsum(dim=-1)
        # Drop tokens whose preceding mass already reaches top_p (the first always stays).
        probs = probs.masked_fill(cdf - probs >= top_p[:, None], 0.0)
        cdf = probs.cumsum(dim=-1)
        draws = torch.tensor(np.array([s.rng.random() for s in seqs]), dtype=cdf.dtype)
        targets = draws * cdf[:, -1]
        choice = torch.searchsorted(cdf, targets[:, None], right=True).clamp_(max=vocab - 1)
        return order.gather(1, choice).squeeze(1).tolist()
