"""How a step's sequences are grouped into forward passes."""

from __future__ import annotations

from dataclasses import dataclass

from llmserve.engine.sequence import Sequence

# What one more forward pass costs, in padded token positions: a prefill group is split off
# only when it saves more padding than this.
PREFILL_PASS_OVERHEAD_TOKENS = 32


# Prefill passes of at least this many tokens use `prefill_num_threads`: a burst's big pass gains from
# more cores, while a lone short prompt would only pay for waking them.
PARALLEL_PREFILL_MIN_TOKENS = 64

# Prompts packed into one pass, at most this many tokens: the first tokens of a big step's early
# prompts go out after their own pass, and a pass's padded attention (B x longest^2) stays small.
MAX_PACKED_PREFILL_TOKENS = 512


def packed_prefill_groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Prompts for a runner that packs them (`packs_prefill`): consecutive runs of at most
    MAX_PACKED_PREFILL_TOKENS tokens (a longer prompt goes alone)."""
    groups: list[list[Sequence]] = []
    tokens = MAX_PACKED_PREFILL_TOKENS
    for seq in seqs:
        n = len(seq.pending_ids)
        if tokens + n > MAX_PACKED_PREFILL_TOKENS:
            groups.append([])
            tokens = 0
        groups[-1].append(seq)
        tokens += n
    return groups


def prefill_groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Prompts padded into as few forward passes as pay off: sorted by length, split where the
    padding saved beats a pass's overhead (an exact partition by dynamic programming)."""
    if len(seqs) <= 1:
        return [seqs] if seqs else []
    ordered = sorted(seqs, key=lambda s: len(s.pending_ids))
    lengths = [len(s.pending_ids) for s in ordered]
    # best[j]: cheapest cost of the first j prompts; a group ordered[i:j] costs (j - i) * lengths[j - 1].
    best, cut = [0.0] + [float("inf")] * len(ordered), [0] * (len(ordered) + 1)
    for j in range(1, len(ordered) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[j - 1] + PREFILL_PASS_OVERHEAD_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(ordered)
    while j:
        groups.append(ordered[cut[j]:j])
        j = cut[j]
    return groups[::-1]


@dataclass(slots=True, frozen=True)
class ForwardPass:
    seqs: list[Sequence]
    prefill: bool  # prompts (or their uncached rests); False: the decode pass

    @property
    def num_tokens(self) -> int:
        return sum(len(s.pending_ids) for s in self.seqs)


def plan_passes(prefill: list[Sequence], decode: list[Sequence], *, packs_prefill: bool) -> list[ForwardPass]:
    """A step's passes: fresh prompts (packed when the runner packs them, else padded in groups), the
    rests of prompts with a cached prefix (padded, grouped by length), then one decode pass that
    prompts cached but for their last token join."""
    fresh, rests, joining = [], [], []
    for seq in prefill:
        uncached = len(seq.ids) - seq.num_cached
        (fresh if not seq.num_cached else joining if uncached == 1 else rests).append(seq)
    grouping = packed_prefill_groups if packs_prefill else prefill_groups
    passes = [ForwardPass(group, prefill=True) for group in grouping(fresh) + prefill_groups(rests)]
    if joining:
        decode = sorted(decode + joining, key=lambda s: s.slot)
    if decode:
        passes.append(ForwardPass(decode, prefill=False))
    return passes
