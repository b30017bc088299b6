"""``speculative_generate``: draft, verify the whole tree in one target call, accept exactly, commit.

Every round, per row: the drafter proposes a tree after the *root* (the last committed token, which the target
has not consumed yet); the target evaluates ``[root; tree]`` in one forward without touching its committed
state; ``accept`` picks the path and the next token; the target commits the path's already-computed states
(linear layers: (k̂, v) appended; softmax layers: the path's KV columns kept); the drafter rolls forward by the
same tokens. Rows advance at their own rate and leave the batch when done.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from linspec.errors import LinspecError
from linspec.models.runner import ModelRunner
from linspec.speculative.acceptance import accept
from linspec.speculative.drafters import Draft, Drafter, DraftRequest
from linspec.speculative.sampling import SamplingConfig
from linspec.speculative.tree import DraftTree
from linspec.utils.validation import check_count, is_count

DEFAULT_MAX_TREE_NODES = 64
MAX_TREE_NODES = 256  # the most draft tokens one round may verify: far beyond any useful tree, small to allocate


@dataclass
class SpeculativeStats:
    """Counters of one ``speculative_generate`` call (sums over rows; rates are per row-round)."""

    new_tokens: int = 0
    target_calls: int = 0  # verification forwards (the prefill is not counted)
    row_rounds: int = 0  # (row, round) pairs: one target call advances every active row
    drafted: int = 0  # valid draft nodes proposed
    accepted: int = 0  # draft tokens accepted
    proposed_at_depth: list[int] = field(default_factory=list)  # rows whose tree reached depth d + 1
    accepted_at_depth: list[int] = field(default_factory=list)  # rows that accepted a token at depth d + 1
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0  # the target's forward over the tree, acceptance and the commit
    commit_seconds: float = 0.0  # of which: committing the accepted path

    @property
    def tokens_per_call(self) -> float:
        """Tokens a prompt keeps per target call it takes part in: ``new_tokens / row_rounds`` (one prompt:
        ``new_tokens / target_calls``). Drafts accepted past an EOS or the budget are not kept, so not counted."""
        return self.new_tokens / max(self.row_rounds, 1)

    @property
    def acceptance_by_depth(self) -> list[float]:
        return [a / max(p, 1) for a, p in zip(self.accepted_at_depth, self.proposed_at_depth, strict=True)]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "tokens_per_call": self.tokens_per_call,
            "acceptance_by_depth": self.acceptance_by_depth,
            "tokens_per_second": self.tokens_per_second,
        }

    def count_depths(self, proposed: torch.Tensor, accepted: torch.Tensor) -> None:
        """Add one round: ``proposed [B]`` deepest draft per row, ``accepted [B]`` drafts accepted per row."""
        deepest = int(proposed.max()) if proposed.numel() else 0
        while len(self.proposed_at_depth) < deepest:
            self.proposed_at_depth.append(0)
            self.accepted_at_depth.append(0)
        for depth in range(1, deepest + 1):
            self.proposed_at_depth[depth - 1] += int((proposed >= depth).sum())
            self.accepted_at_depth[depth - 1] += int((accepted >= depth).sum())


@dataclass
class SpeculativeOutput:
    """``sequences [B, T + max_new_tokens]``: each input row (its left padding kept) then its new tokens, padded
    with ``pad_token_id`` after a row ends (EOS or budget), like ``generate()``."""

    sequences: torch.Tensor
    stats: SpeculativeStats


class NoDrafter(Drafter):
    """Plain decoding through the same machinery: an empty tree, so each round commits the target's one token."""

    def propose(self, request: DraftRequest) -> Draft:
        return Draft(DraftTree.empty(request.lengths.shape[0], request.sequences.device))


def _validated_prompt(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        input_ids = torch.as_tensor(input_ids)
    except (TypeError, ValueError, RuntimeError):
        kind = type(input_ids).__name__
        raise LinspecError(f"input_ids must be a [batch, length] integer tensor, got {kind}") from None
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype not in (torch.long, torch.int):
        raise LinspecError(
            f"input_ids must be a non-empty [batch, length] integer tensor, got {input_ids.dtype} of shape "
            f"{tuple(input_ids.shape)}"
        )
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask)
    if mask.dim() == 1:
        mask = mask[None]
    mask = mask.to(input_ids.device).bool()
    if mask.shape != input_ids.shape:
        raise LinspecError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    if not bool(mask.any(1).all()):
        raise LinspecError("every prompt needs at least one token (a row of attention_mask is all zeros)")
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise LinspecError("prompts must be left-padded (padding before the tokens), as for generate()")
    return input_ids.long(), mask


def _check_fits_the_model(target, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> None:
    """Token ids inside the vocabulary, and prompt + new tokens within the model's positions (which also bounds
    what is allocated up front)."""
    vocab = target.get_output_embeddings().weight.shape[0]
    real = input_ids[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
        bad = int(real.min()) if int(real.min()) < 0 else int(real.max())
        raise LinspecError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
    limit = getattr(target.config.get_text_config(decoder=True), "max_position_embeddings", None)
    longest = int(mask.sum(1).max())
    if limit is not None and longest + max_new_tokens > limit:
        raise LinspecError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's {limit} positions "
            "(max_position_embeddings)"
        )


@torch.no_grad()
def speculative_generate(
    target,
    drafter: Drafter | None,
    input_ids,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    attention_mask=None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    max_tree_nodes: int = DEFAULT_MAX_TREE_NODES,
    streamer=None,
) -> SpeculativeOutput:
    """Generate with ``target`` (a linspec model, a hybrid, or a Llama-family HF softmax model) and ``drafter``.

    Greedy output equals the target's plain greedy decoding; sampled output follows the target's distribution
    under the same temperature / top-k / top-p. ``drafter=None`` decodes plainly through the same code.
    Prompts in a batch are left-padded (``attention_mask``). ``streamer``: as for ``generate()`` (e.g.
    ``transformers.TextStreamer``), one prompt only: ``put`` gets the prompt, then each round's kept tokens as
    they are accepted, and ``end`` closes it. Raises ``LinspecError`` on bad input.
    """
    check_count(max_new_tokens, "max_new_tokens")
    check_count(max_tree_nodes, "max_tree_nodes", 1, MAX_TREE_NODES)
    if not callable(getattr(target, "get_output_embeddings", None)):
        raise LinspecError(f"target must be a causal language model, got {type(target).__name__}")
    if drafter is not None and not isinstance(drafter, Drafter):
        raise LinspecError(f"drafter must be a linspec Drafter (or None), got {type(drafter).__name__}")
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    drafter = drafter or NoDrafter()
    if drafter.max_nodes > max_tree_nodes:
        raise LinspecError(
            f"the drafter can propose {drafter.max_nodes} tokens per round, above the limit of {max_tree_nodes} "
            "(max_tree_nodes); use fewer draft tokens or a narrower tree"
        )
    input_ids, mask = _validated_prompt(input_ids, attention_mask)
    _check_fits_the_model(target, input_ids, mask, max_new_tokens)
    if streamer is not None and input_ids.shape[0] != 1:
        raise LinspecError(f"a streamer takes one prompt at a time, got a batch of {input_ids.shape[0]}")
    try:
        eos = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise LinspecError(f"eos_token_id must be a token id or a list of them, got {eos_token_id!r:.40}") from None
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    vocab = target.get_output_embeddings().weight.shape[0]
    for name, ids in (("eos_token_id", eos.tolist()), ("pad_token_id", [pad])):
        if not all(is_count(i, 0, vocab - 1) for i in ids):
            raise LinspecError(f"{name} must be token ids in 0..{vocab - 1}, got {ids if len(ids) > 1 else ids[0]!r}")
    device = target.get_output_embeddings().weight.device
    input_ids, mask, eos = input_ids.to(device), mask.to(device), eos.to(device)
    stats = SpeculativeStats()
    start = time.perf_counter()

    batch, prompt_width = input_ids.shape
    lengths = mask.sum(1)
    # Committed tokens per row, left-aligned; room for a full last round past the budget.
    capacity = prompt_width + max_new_tokens + drafter.max_nodes + 1
    sequences = torch.full((batch, capacity), pad, dtype=torch.long, device=device)
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # real tokens first
    sequences[:, :prompt_width] = torch.where(mask.gather(1, order), input_ids.gather(1, order), pad)
    prompt_lengths = lengths.clone()

    target_runner = ModelRunner(target, batch)
    target_hidden = None
    if prompt_width > 1:  # everything but the last token; the last one is the first round's root
        target_hidden = target_runner.extend(input_ids[:, :-1], mask[:, :-1])
    drafter.start(target_runner, sequences, lengths)
    stats.prefill_seconds = time.perf_counter() - start
    if streamer is not None:
        streamer.put(input_ids[mask].cpu())

    active = torch.arange(batch, device=device)  # original row of each batch row still generating
    while active.numel():
        room = int((prompt_lengths[active] + max_new_tokens - lengths[active]).max())
        request = DraftRequest(
            sequences=sequences[active],
            lengths=lengths[active],
            max_depth=room - 1,
            sampling=sampling,
            generator=generator,
            target_hidden=target_hidden,
        )
        emitted, count, target_hidden, accepted_drafts, tree_depth = speculative_round(
            target_runner, drafter, request, max_tree_nodes, stats
        )
        stats.target_calls += 1
        stats.row_rounds += active.numel()
        stats.accepted += int(accepted_drafts.sum())
        stats.count_depths(tree_depth, accepted_drafts)

        # Keep what fits the budget and stops at the first EOS.
        row_lengths = lengths[active]
        count = torch.minimum(count, prompt_lengths[active] + max_new_tokens - row_lengths)
        position = torch.arange(emitted.shape[1], device=device)
        is_eos = torch.isin(emitted, eos) & (position < count[:, None])
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, count)
        count = torch.minimum(count, first_eos)
        index = row_lengths[:, None] + position
        written = position < count[:, None]
        rows_seq = sequences[active]
        rows_seq.scatter_(1, torch.where(written, index, capacity - 1), torch.where(written, emitted, pad))
        rows_seq[:, capacity - 1] = pad
        sequences[active] = rows_seq
        lengths[active] = row_lengths + count
        stats.new_tokens += int(count.sum())
        if streamer is not None and int(count[0]):
            streamer.put(emitted[0, : int(count[0])].cpu())

        done = is_eos.any(1) | (lengths[active] - prompt_lengths[active] >= max_new_tokens)
        if bool(done.any()):
            keep = (~done).nonzero()[:, 0]
            active = active[keep]
            if active.numel():
                target_runner.select_rows(keep)
                drafter.select_rows(keep)
                target_hidden = None if target_hidden is None else target_hidden[keep]

    stats.seconds = time.perf_counter() - start
    if streamer is not None:
        streamer.end()
    new = torch.arange(max_new_tokens, device=device)
    new_index = (prompt_lengths[:, None] + new).clamp(max=capacity - 1)
    generated = torch.where(new < (lengths - prompt_lengths)[:, None], sequences.gather(1, new_index), pad)
    return SpeculativeOutput(sequences=torch.cat([input_ids, generated], 1), stats=stats)


def speculative_round(
    target: ModelRunner, drafter: Drafter, request: DraftRequest, max_tree_nodes: int, stats: SpeculativeStats
):
    """One round for every active row: ``(emitted [B, D+1], count [B], hidden [B, H], accepted [B], depth [B])``.

    q — the drafter's distributions (``tree.q``); p — the target's, from one forward over ``[root; tree]``.
    """
    began = time.perf_counter()
    tree, drafter_state = drafter.propose(request)  # q
    if tree.num_nodes > max_tree_nodes:
        raise LinspecError(f"the drafter proposed {tree.num_nodes} tokens, above max_tree_nodes={max_tree_nodes}")
    drafted = time.perf_counter()
    root = request.sequences.gather(1, (request.lengths - 1)[:, None])[:, 0]
    tokens, parents, valid = tree.with_root(root)
    if tree.num_nodes == 0:  # nothing drafted: a plain decoding step (the root is committed as it is evaluated)
        final = target.extend(root[:, None])[:, None]  # (B, 1, H)
    elif tree.target_pass is not None:  # the drafter already ran the target's first layers on this tree
        verification = tree.target_pass
        layer, hidden = tree.target_hidden
        final = target.final_hidden(verification.run_layers(hidden, layer))
    else:
        verification = target.begin_tree(tokens, parents)
        final = target.final_hidden(verification.run_layers(verification.hidden))  # (B, 1 + N, H)
    logits = target.logits(final)  # p at every node, before warping
    q = None if tree.q is None else torch.cat([torch.zeros_like(tree.q[:, :1]), tree.q], 1)
    # Accept a drafted x with probability min(1, p(x)/q(x)), siblings in turn (greedy: x must be argmax p);
    # after a rejection test the next sibling against the residual norm(max(0, p − q));
    # the path's next token is drawn from what is left of p (all accepted: a bonus token from p at the leaf).
    path, path_mask, next_token = accept(logits, tokens, parents, valid, q, request.sampling, request.generator)
    if tree.num_nodes:
        committing = time.perf_counter()
        verification.commit(path, path_mask)
        stats.commit_seconds += time.perf_counter() - committing

    accepted = path_mask.sum(1) - 1  # draft tokens accepted per row
    drafter.advance(drafter_state, (path[:, 1:] - 1).clamp(min=0), path_mask[:, 1:])
    rows = torch.arange(path.shape[0], device=path.device)
    last = path[rows, accepted]
    emitted = torch.cat([tokens.gather(1, path[:, 1:]), torch.zeros_like(root)[:, None]], 1)
    emitted[rows, accepted] = next_token

    stats.drafted += int(valid[:, 1:].sum())
    stats.draft_seconds += drafted - began
    stats.verify_seconds += time.perf_counter() - drafted
    tree_depth = _tree_depth(tree)
    return emitted, accepted + 1, final[rows, last], accepted, tree_depth


def _tree_depth(tree) -> torch.Tensor:
    """``[B]`` depth of each row's deepest valid node (0 for an empty tree)."""
    if tree.num_nodes == 0:
        return torch.zeros(tree.tokens.shape[0], dtype=torch.long, device=tree.tokens.device)
    return torch.where(tree.valid, tree.depths(), 0).max(1).values


def generate_text(
    target, tokenizer, prompts: list[str], drafter: Drafter | None, max_new_tokens: int, chat: bool = True, **options
) -> tuple[list[str], SpeculativeStats]:
    """Prompts in, completions out (special tokens dropped), with the run's statistics; EOS from the model."""
    from linspec.data.prompts import encode_prompts

    input_ids, mask = encode_prompts(tokenizer, prompts, chat)
    options.setdefault("eos_token_id", target.generation_config.eos_token_id)
    options.setdefault("pad_token_id", tokenizer.pad_token_id)
    out = speculative_generate(target, drafter, input_ids, max_new_tokens, attention_mask=mask, **options)
    texts = tokenizer.batch_decode(out.sequences[:, input_ids.shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts], out.stats
