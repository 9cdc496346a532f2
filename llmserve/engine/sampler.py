"""Next-token selection: penalties, banned tokens, then greedy or seeded sampling.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p
over one sort, then invert the CDF with a uniform draw from the sequence's own
generator, so a seeded request is reproducible whatever else is in the batch.

Rows that asked for log probabilities get them from the same logits the token
is chosen from, after penalties and banned tokens and before temperature,
top-k and top-p (vLLM's "processed logits" without the sampling transforms).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(slots=True, frozen=True)
class TokenLogprobs:
    """The chosen token's log probability and the `top_logprobs` most likely tokens at its position."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


def token_logprobs(logits: torch.Tensor, tokens: list[int], seqs: list[Sequence]) -> list[TokenLogprobs | None]:
    """Log probabilities of the chosen tokens, for the rows whose request asked for them: `logits` as
    `Sampler` left them."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs]
    result: list[TokenLogprobs | None] = [None] * len(seqs)
    if not rows:
        return result
    log_probs = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = log_probs.gather(1, torch.tensor([[tokens[i]] for i in rows])).squeeze(1).tolist()
    k = max(seqs[i].params.top_logprobs for i in rows)
    top_values, top_ids = (log_probs.topk(k, dim=-1) if k else (log_probs[:, :0], log_probs[:, :0].long()))
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for row, i in enumerate(rows):
        k_i = seqs[i].params.top_logprobs
        result[i] = TokenLogprobs(chosen[row], top_ids[row][:k_i], top_values[row][:k_i])
    return result


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """The next token of each sequence. `logits` is left as the tokens were chosen from (penalties
        and banned tokens applied) for `token_logprobs`."""
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
