"""A1111 prompt editing: ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and alternation ``[a|b]``.

A prompt becomes a schedule: a list of (last step, plain prompt text) pairs, the text still holding its attention
syntax ``(word:1.2)``, which the prompt encoder reads afterwards. Semantics are A1111's (modules/prompt_parser.py
``get_learned_conditioning_prompt_schedules``, read and rewritten here without lark):

* ``when`` with a decimal point is a fraction of the steps, else a step number; the text before the edit is used
  while step <= when (steps counted from 1). On a hires pass, fractions count from 1.0 (``1.5`` = half way
  through the second pass) and step numbers from the first pass's steps.
* ``[a|b|c]`` takes option (step - 1) mod n at every step; an empty option is the empty text.
* The grammar is A1111's: ``(..)``, ``(..:..)`` and ``[..]`` are emphasis (kept as text), ``\\x`` escapes a
  character; stray brackets and colons at the top level are text. A prompt that still does not parse (a stray
  ``|``, a trailing backslash, brackets nested over MAX_NESTING deep) is used unscheduled, as A1111 does.

During sampling A1111 moves along the schedule once per model evaluation, starting at 0
(``CFGDenoiser.step``): evaluation k uses the first entry whose last step is >= k. ``ScheduledCond`` does the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

_NUMBER_END = re.compile(r"\s*([+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")
_SPECIAL = set("[]():|")


@dataclass
class _Edit:
    before: list  # nodes; empty for [to:when]
    after: list
    when: str  # as written: "." decides fraction or step
    step: int = 0  # resolved for one schedule


@dataclass
class _Alternate:
    options: list = field(default_factory=list)  # a list of node lists


Node = Union[str, _Edit, _Alternate]


class _NoParse(Exception):
    pass


MAX_NESTING = 100  # brackets inside brackets; deeper prompts are used unscheduled (the parser recurses per level)


class _Parser:
    def __init__(self, text: str):
        self.s, self.n = text, len(text)
        self.depth = 0

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _NoParse

    def top(self) -> list[Node]:
        """start: (prompt | /[][():]/+)*"""
        nodes, i = [], 0
        while i < self.n:
            part, i = self.prompt(i)
            nodes += part
            if i < self.n:
                if self.s[i] == "|":
                    raise _NoParse
                nodes.append(self.s[i])  # a bracket or colon that opens nothing: text
                i += 1
        return nodes

    def prompt(self, i: int) -> tuple[list[Node], int]:
        """prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*; stops before ) ] : | or a
        bracket that does not parse."""
        nodes: list[Node] = []
        while i < self.n:
            c = self.s[i]
            if c in "([":
                parsed = (self.round if c == "(" else self.square)(i)
                if parsed is None:
                    break
                part, i = parsed
                nodes += part
            elif c in _SPECIAL:
                break
            else:
                j = i
                while j < self.n and self.s[j] not in _SPECIAL:
                    if self.s[j] == "\\":
                        if j + 1 >= self.n:
                            raise _NoParse  # a trailing backslash escapes nothing
                        j += 1
                    j += 1
                nodes.append(self.s[i:j])
                i = j
        return nodes, i

    def at(self, i: int) -> str:
        return self.s[i] if i < self.n else ""

    def round(self, i: int) -> tuple[list[Node], int] | None:
        """( prompt ) | ( prompt : prompt )"""
        self._enter()
        try:
            return self._round(i)
        finally:
            self.depth -= 1

    def _round(self, i: int) -> tuple[list[Node], int] | None:
        inner, k = self.prompt(i + 1)
        if self.at(k) == ")":
            return ["(", *inner, ")"], k + 1
        if self.at(k) == ":":
            second, m = self.prompt(k + 1)
            if self.at(m) == ")":
                return ["(", *inner, ":", *second, ")"], m + 1
        return None

    def square(self, i: int) -> tuple[list[Node], int] | None:
        """[ prompt ] | [ [prompt :] prompt : NUMBER ] | [ prompt (| [prompt])+ ]"""
        self._enter()
        try:
            return self._square(i)
        finally:
            self.depth -= 1

    def _square(self, i: int) -> tuple[list[Node], int] | None:
        first, k = self.prompt(i + 1)
        c = self.at(k)
        if c == "]":
            return ["[", *first, "]"], k + 1
        if c == "|":
            options = [first]
            while self.at(k) == "|":
                option, k = self.prompt(k + 1)
                options.append(option)
            return ([_Alternate(options)], k + 1) if self.at(k) == "]" else None
        if c == ":":
            number = _NUMBER_END.match(self.s, k + 1)
            if number:
                return [_Edit([], first, number.group(1))], number.end()
            second, m = self.prompt(k + 1)
            if self.at(m) == ":":
                number = _NUMBER_END.match(self.s, m + 1)
                if number:
                    return [_Edit(first, second, number.group(1))], number.end()
        return None


def _walk(nodes: list[Node]):
    for node in nodes:
        yield node
        if isinstance(node, _Edit):
            yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            for option in node.options:
                yield from _walk(option)


def _text(nodes: list[Node], step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            out.append(_text(node.before if step <= node.step else node.after, step))
        else:
            out.append(_text(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """[(last step, text), ...] covering steps 1..steps (or the hires pass's 1..hires_steps); one entry when the
    prompt has no edits."""
    if "[" not in prompt and hires_steps != 0:
        # Edits and alternations open with '['. Without one the parse gives the text back unchanged (or fails:
        # used unscheduled), so the character-by-character parser is skipped: a 100,000-line prompts file
        # checks every line's schedule before the first image.
        return [(hires_steps or steps, prompt)]
    try:
        nodes = _Parser(prompt).top()
    except _NoParse:
        return [(hires_steps or steps, prompt)]
    total, int_offset, frac_offset = (steps, 0, 0.0) if hires_steps is None else (hires_steps, steps, 1.0)
    ends = {total}
    for node in _walk(nodes):
        if isinstance(node, _Edit):
            v = float(node.when)
            v = (v - frac_offset) * total if "." in node.when else v - int_offset
            node.step = int(max(-1.0, min(total, v)))  # clamped first: '[a:b:1e400]' is inf, which int() refuses
            if node.step >= 1:
                ends.add(node.step)
        elif isinstance(node, _Alternate):
            ends.update(range(1, total + 1))
    return [(end, _text(nodes, end)) for end in sorted(ends)]


@dataclass(frozen=True)
class ScheduledCond:
    """Conditioning that changes along the sampling: (last model evaluation, cond) pairs, evaluations counted
    from 0 as A1111 counts them."""

    entries: tuple

    def at(self, evaluation: int):
        for end, cond in self.entries:
            if evaluation <= end:
                return cond
        return self.entries[-1][1]
