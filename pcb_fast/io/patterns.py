"""Regular expressions from untrusted files, matched with bounded work.

A PEFT adapter's ``rank_pattern`` / ``alpha_pattern`` keys are regular expressions that PEFT
matches against module names with ``re.match(rf"(.*\\.)?({p})$", module)``. Python's ``re``
backtracks, so a pattern such as ``(a|a)+`` takes time exponential in the name's length. Here the
same pattern is parsed by Python's own parser and run as a set-of-positions automaton: every node
maps the set of positions where it may start to the set where it may end, so the work is at most
about (pattern size) x (name length)^2 steps, whatever the pattern. Patterns whose meaning a set
of positions cannot express (backreferences, lookarounds, atomic groups, possessive repeats,
conditionals) are refused in one line.
"""

from __future__ import annotations

import functools
import re

try:  # Python >= 3.11
    from re import _constants as C, _parser as P
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as C
    import sre_parse as P

NAME_LIMIT = 1024  # longest module name matched (PEFT module names are far shorter)
PATTERN_LIMIT = 1024  # longest pattern run


class PatternError(ValueError):
    """A pattern this matcher does not run (its meaning needs backtracking)."""


def _char_in(ch: str, items, ignore_case: bool) -> bool:
    negate = False
    hit = False
    for op, av in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            hit = hit or _same(ch, chr(av), ignore_case)
        elif op is C.RANGE:
            lo, hi = av
            hit = hit or lo <= ord(ch) <= hi or (ignore_case and (lo <= ord(ch.lower()) <= hi
                                                                  or lo <= ord(ch.upper()) <= hi))
        elif op is C.CATEGORY:
            hit = hit or _category(ch, av)
        else:
            raise PatternError(f"character set item {op} is not supported")
    return hit != negate


def _same(a: str, b: str, ignore_case: bool) -> bool:
    return a == b or (ignore_case and a.lower() == b.lower())


def _category(ch: str, category) -> bool:
    tests = {C.CATEGORY_DIGIT: str.isdecimal, C.CATEGORY_SPACE: str.isspace,
             C.CATEGORY_WORD: lambda c: c.isalnum() or c == "_"}
    for positive, negative in ((C.CATEGORY_DIGIT, C.CATEGORY_NOT_DIGIT), (C.CATEGORY_SPACE, C.CATEGORY_NOT_SPACE),
                               (C.CATEGORY_WORD, C.CATEGORY_NOT_WORD)):
        if category is positive:
            return tests[positive](ch)
        if category is negative:
            return not tests[positive](ch)
    raise PatternError(f"character category {category} is not supported")


class _Matcher:
    def __init__(self, text: str, ignore_case: bool, dotall: bool):
        self.text, self.n, self.ignore_case, self.dotall = text, len(text), ignore_case, dotall

    def sequence(self, items, starts: frozenset) -> frozenset:
        for op, av in items:
            if not starts:
                return starts
            starts = self.node(op, av, starts)
        return starts

    def _step(self, starts, test) -> frozenset:
        return frozenset(i + 1 for i in starts if i < self.n and test(self.text[i]))

    def node(self, op, av, starts: frozenset) -> frozenset:
        if op is C.LITERAL:
            return self._step(starts, lambda c: _same(c, chr(av), self.ignore_case))
        if op is C.NOT_LITERAL:
            return self._step(starts, lambda c: not _same(c, chr(av), self.ignore_case))
        if op is C.ANY:
            return self._step(starts, lambda c: self.dotall or c != "\n")
        if op is C.IN:
            return self._step(starts, lambda c: _char_in(c, av, self.ignore_case))
        if op is C.SUBPATTERN:
            group, add_flags, del_flags, items = av
            if add_flags or del_flags:
                raise PatternError("inline flags inside a group are not supported")
            return self.sequence(items, starts)
        if op is C.BRANCH:
            ends = set()
            for items in av[1]:
                ends |= self.sequence(items, starts)
            return frozenset(ends)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):  # greedy or lazy: the same set of possible ends
            low, high, items = av
            current = starts
            for _ in range(low):
                current = self.sequence(items, current)
                if not current:
                    return current
            reached, frontier, count = set(current), current, low
            while frontier and (high == C.MAXREPEAT or count < high):
                frontier = self.sequence(items, frontier) - reached
                reached |= frontier
                count += 1
            return frozenset(reached)
        if op is C.AT:
            if av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
                return frozenset(i for i in starts if i == 0)
            if av is C.AT_END_STRING:
                return frozenset(i for i in starts if i == self.n)
            if av is C.AT_END:  # $ also matches before a final newline
                return frozenset(i for i in starts if i == self.n or (i == self.n - 1 and self.text[-1] == "\n"))
            raise PatternError(f"the anchor {av} is not supported")
        raise PatternError(f"{op} is not supported (it needs backtracking)")


@functools.lru_cache(maxsize=256)
def _parse(pattern: str):
    if len(pattern) > PATTERN_LIMIT:
        raise PatternError(f"a pattern of {len(pattern)} characters is longer than {PATTERN_LIMIT}")
    try:
        parsed = P.parse(rf"(.*\.)?({pattern})$", 0)
    except (re.error, RecursionError, OverflowError) as e:
        raise PatternError(f"not a regular expression: {e}") from None
    flags = parsed.state.flags
    if flags & ~(re.IGNORECASE | re.DOTALL | re.UNICODE):
        raise PatternError("only the flags i and s are supported")
    return list(parsed), bool(flags & re.IGNORECASE), bool(flags & re.DOTALL)


def peft_match(pattern: str, name: str) -> bool:
    """``re.match(rf"(.*\\.)?({pattern})$", name)`` as PEFT's ``get_pattern_key``, with bounded work.

    Raises PatternError (a ValueError) for patterns that are not regular expressions or use
    features outside a finite automaton's reach, and for names or patterns over 1024 characters."""
    if len(name) > NAME_LIMIT:
        raise PatternError(f"a module name of {len(name)} characters is longer than {NAME_LIMIT}")
    items, ignore_case, dotall = _parse(pattern)
    try:
        return bool(_Matcher(name, ignore_case, dotall).sequence(items, frozenset([0])))
    except RecursionError:
        raise PatternError("nested too deeply") from None
