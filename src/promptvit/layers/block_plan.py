"""The block loop's plan: what happens before each block and which output rows a block computes.

``PromptModel`` builds one :class:`BlockPlan` per forward (:func:`block_plan`) from the loop changes of the
adapters the forward uses (:class:`~promptvit.layers.base.Injections`: token schedules, block-input
changes, image changes; in a mixed batch each on its own samples) and the
:class:`~promptvit.layers.base.ForwardPlan` flags; the family adapter runs its blocks and asks the plan
(``BackboneAdapter.forward_blocks(tokens, plan)``):

* ``before_block(i, x)``: prompt tokens go in after the prefix tokens (deep prompts replace the previous
  block's), then block-input changes (VP's token prompt, AP's activation prompt) act on the sequence;
* ``output_rows(i)``: ``None`` (every row), or the rows the block must compute: without the prompt tokens
  when the next block replaces them or the final norm strips them (*prompt-output skipping*), only the
  class token in the last block when the head reads nothing else (*class-token readout*). Every token
  still serves as key and value (:mod:`promptvit.layers.selected_tokens`);
* ``after_blocks(x)``: the prompt tokens are stripped before the final norm;
* ``stage_done(stage, input, output)``: a stage run block by block (Swin's with prompts) tells whoever records
  stage outputs, since the stage module's hooks do not fire.

The plan decides which rows are computed, never the logits (beyond float rounding).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from promptvit.layers.base import AdapterRouting, ForwardPlan, Injections, on_rows
from promptvit.layers.selected_tokens import class_token_row, drop_token_range
from promptvit.layers.token_prompts import TokenSchedule, expand_prompts, replace_prompts, strip_prompts

Change = Callable[[torch.Tensor], torch.Tensor]


class BlockPlan:
    """What the block loop does in one forward (see the module docstring).

    ``tokens``: the token schedule of the forward (or None); ``block_inputs``: block -> changes of its
    input, applied in order; ``readout_block``: the block that computes only the class-token row (the last
    one, where the class-token readout applies), or None.
    """

    def __init__(
        self,
        flags: ForwardPlan,
        *,
        tokens: TokenSchedule | None = None,
        block_inputs: dict[int, Sequence[Change]] | None = None,
        readout_block: int | None = None,
    ) -> None:
        self.flags = flags
        self.tokens = tokens if flags.token_prompts else None
        self.block_inputs = block_inputs or {}
        self.readout_block = readout_block

    def skips_prompt_outputs(self, block: int) -> bool:
        """Whether ``block`` outputs no prompt tokens in this forward."""
        return self.tokens is not None and self.flags.skip_prompt_outputs and block in self.tokens.skipping

    def puts_in_prompts(self, block: int) -> bool:
        """Whether ``block`` puts in prompt tokens (of length 0 too: dropping the ones in the stream)."""
        return self.tokens is not None and block in self.tokens.inserts

    def inserts(self, block: int, x: torch.Tensor) -> torch.Tensor | None:
        """The prompt tokens ``block`` puts in, (batch, L, d), for its input ``x``; None where it puts in none."""
        tokens = self.tokens
        if not self.puts_in_prompts(block):
            return None
        return expand_prompts(tokens.prompts(block, x), x.shape[0])

    def before_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """The input of ``block`` in a token sequence: its prompts in (replacing the ones in the stream),
        then the block-input changes."""
        prompts = self.inserts(block, x)
        if prompts is not None:
            in_stream, _ = self.tokens.inserts[block]
            num_old = 0 if self.skips_prompt_outputs(block - 1) else in_stream
            x = replace_prompts(x, prompts, self.tokens.num_prefix_tokens, num_old)
        for change in self.block_inputs.get(block, ()):
            x = change(x)
        return x

    def output_rows(self, block: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if block == self.readout_block:
            return class_token_row
        if self.skips_prompt_outputs(block):
            start, count = self.tokens.num_prefix_tokens, self.tokens.in_block[block]
            return lambda rows: drop_token_range(rows, start, count)
        return None

    def stage_done(self, stage: int, stage_input: torch.Tensor, output: torch.Tensor) -> None:
        """A family that runs a stage's blocks itself reports the stage's input and output here, as the stage
        module's forward hooks would have seen them (``ForwardPlan.stage_outputs``)."""
        if self.flags.stage_outputs is not None:
            self.flags.stage_outputs(stage, stage_input, output)

    def after_blocks(self, x: torch.Tensor, last_block: int) -> torch.Tensor:
        """The output of ``blocks[last_block]`` without prompt tokens, as the final norm receives it."""
        tokens = self.tokens
        if (
            tokens is None
            or not tokens.at_norm
            or self.skips_prompt_outputs(last_block)
            # no more rows than prefix tokens: only the class token was computed (the readout)
            or x.shape[-2] <= tokens.num_prefix_tokens
        ):
            return x
        return strip_prompts(x, tokens.num_prefix_tokens, tokens.at_norm)


def loop_changes(
    ledger: Injections, routing: AdapterRouting, kind: str
) -> list[tuple[Any, torch.Tensor | None]]:
    """The loop changes of one kind of the adapters this forward uses, each with the rows it applies to
    (``None``: every row)."""
    if not ledger.active:
        return []
    rows_of = dict(routing.groups(routing.present()))
    return [(entry, rows_of[entry.owners[0]]) for entry in ledger.entries(kind, rows_of)]


def changed_images(ledger: Injections, routing: AdapterRouting, images: torch.Tensor) -> torch.Tensor:
    """The images after the pixel prompts of the adapters this forward uses, each on its own samples."""
    for entry, rows in loop_changes(ledger, routing, "images"):
        images = on_rows(images, rows, entry.target)
    return images


def block_plan(
    flags: ForwardPlan, ledger: Injections, routing: AdapterRouting, readout_block: int | None = None
) -> BlockPlan:
    """The plan of one forward from the loop changes of the adapters it uses (each on its own samples)."""
    block_inputs: dict[int, list[Change]] = {}
    for entry, rows in loop_changes(ledger, routing, "block_input"):
        change = entry.target if rows is None else functools.partial(on_rows, rows=rows, change=entry.target)
        block_inputs.setdefault(entry.index, []).append(change)
    schedules = [(entry.target, rows) for entry, rows in loop_changes(ledger, routing, "tokens")]
    return BlockPlan(
        flags, tokens=merged_schedule(schedules), block_inputs=block_inputs, readout_block=readout_block
    )


def merged_schedule(schedules: list[tuple[TokenSchedule, torch.Tensor | None]]) -> TokenSchedule | None:
    """One schedule for a forward whose samples' adapters insert tokens the same way (``layout``); each
    sample gets its own adapter's prompts. A block skips its prompt outputs only where every adapter lets it."""
    if not schedules:
        return None
    if len(schedules) == 1 and schedules[0][1] is None:
        return schedules[0][0]
    first = schedules[0][0]
    if any(schedule.layout != first.layout for schedule, _ in schedules):
        raise ValueError("samples whose adapters insert different prompt tokens cannot share one forward")

    def prompts(block: int, x: torch.Tensor) -> torch.Tensor:
        gathered = None
        for schedule, rows in schedules:
            rows_prompts = expand_prompts(schedule.prompts(block, x[rows]), len(rows))
            if gathered is None:
                gathered = rows_prompts.new_empty(x.shape[0], *rows_prompts.shape[1:])
            gathered[rows] = rows_prompts
        return gathered

    return dataclasses.replace(
        first,
        skipping=frozenset.intersection(*(schedule.skipping for schedule, _ in schedules)),
        prompts=prompts,
    )
