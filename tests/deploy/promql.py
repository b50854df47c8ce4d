"""A small PromQL evaluator for the expressions our alert rules use, so that the tests can
run the chart's exact rule text against synthetic metric series (no Prometheus or promtool
on the CI machine).

Covered, with Prometheus's semantics: instant and range vector selectors with `=`, `!=`,
`=~`, `!~` matchers (5-minute lookback), `rate` (counter resets handled; the slope between
the first and last sample of the window, which equals Prometheus's extrapolated rate for
series scraped at a steady pace), `sum`/`max` with `by (...)`, `histogram_quantile`,
`absent`, `/` between vectors (one-to-one on all labels), comparisons with a scalar
(filters), `or`, parentheses and number literals. Anything else raises `PromQLError`,
so a rule that grows past this subset fails its test loudly instead of evaluating wrongly.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]  # an instant vector: label set -> value
LOOKBACK_S = 300.0
_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)|(?P<dur>\[\d+[smhd]\])|(?P<str>\"(?:[^\"\\]|\\.)*\")"
    r"|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)|(?P<op>=~|!~|!=|==|>=|<=|[(){},/*<>=]))"
)


class PromQLError(ValueError):
    """An expression outside the supported subset."""


@dataclass
class Series:
    """Samples of every series: label set (with `__name__`) -> [(t seconds, value)]."""

    samples: dict[Labels, list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, labels: dict[str, str], t: float, value: float) -> None:
        self.samples.setdefault(frozenset(labels.items()), []).append((t, value))


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos, expr = [], 0, expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise PromQLError(f"cannot read {expr[pos : pos + 20]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    return out


class _Parser:
    """Recursive descent into nested tuples: ("num", x), ("sel", name, matchers, range_s),
    ("agg", op, by, arg), ("call", fn, args), ("bin", op, left, right)."""

    def __init__(self, expr: str) -> None:
        self.toks, self.i = _tokens(expr), 0

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self, want: str | None = None) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise PromQLError("unexpected end of expression")
        tok = self.toks[self.i]
        if want is not None and tok[1] != want:
            raise PromQLError(f"expected {want!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self) -> tuple:
        node = self.expr()
        if self.peek() is not None:
            raise PromQLError(f"unexpected {self.peek()!r}")
        return node

    def expr(self) -> tuple:
        node = self.comparison()
        while self.peek() == "or":
            self.take()
            node = ("bin", "or", node, self.comparison())
        return node

    def comparison(self) -> tuple:
        node = self.arith()
        if self.peek() in (">", "<", ">=", "<=", "==", "!="):
            op = self.take()[1]
            node = ("bin", op, node, self.arith())
        return node

    def arith(self) -> tuple:
        node = self.unary()
        while self.peek() in ("/", "*"):
            op = self.take()[1]
            node = ("bin", op, node, self.unary())
        return node

    def unary(self) -> tuple:
        kind, text = self.take()
        if kind == "num":
            return ("num", float(text))
        if text == "(":
            node = self.expr()
            self.take(")")
            return node
        if kind != "name":
            raise PromQLError(f"unexpected {text!r}")
        if text in ("sum", "max"):
            by: tuple[str, ...] | None = None
            if self.peek() == "by":
                self.take()
                by = self.labels()
            self.take("(")
            arg = self.expr()
            self.take(")")
            return ("agg", text, by, arg)
        if text in ("rate", "histogram_quantile", "absent"):
            self.take("(")
            args = [self.expr()]
            while self.peek() == ",":
                self.take()
                args.append(self.expr())
            self.take(")")
            return ("call", text, args)
        return self.selector(text)

    def labels(self) -> tuple[str, ...]:
        self.take("(")
        names = [self.take()[1]]
        while self.peek() == ",":
            self.take()
            names.append(self.take()[1])
        self.take(")")
        return tuple(names)

    def selector(self, name: str) -> tuple:
        matchers = [("__name__", "=", name)]
        if self.peek() == "{":
            self.take()
            while self.peek() != "}":
                label = self.take()[1]
                op = self.take()[1]
                kind, value = self.take()
                if kind != "str" or op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"bad matcher {label}{op}{value}")
                matchers.append((label, op, value[1:-1]))
                if self.peek() == ",":
                    self.take()
            self.take("}")
        range_s = None
        if self.i < len(self.toks) and self.toks[self.i][0] == "dur":
            text = self.take()[1][1:-1]
            range_s = float(text[:-1]) * _DURATION[text[-1]]
        return ("sel", name, tuple(matchers), range_s)


def _matches(labels: Labels, matchers: Iterable[tuple[str, str, str]]) -> bool:
    d = dict(labels)
    for label, op, value in matchers:
        have = d.get(label, "")
        ok = {
            "=": have == value,
            "!=": have != value,
            "=~": re.fullmatch(value, have) is not None,
            "!~": re.fullmatch(value, have) is None,
        }[op]
        if not ok:
            return False
    return True


def _without_name(labels: Labels) -> Labels:
    return frozenset((k, v) for k, v in labels if k != "__name__")


def _rate(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    increase, prev = 0.0, points[0][1]
    for _, v in points[1:]:
        increase += v - prev if v >= prev else v  # a reset starts the counter from 0
        prev = v
    return increase / (points[-1][0] - points[0][0])


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over (upper bound, cumulative count) buckets."""
    buckets.sort()
    if not buckets or buckets[-1][0] != math.inf:
        return math.nan
    total = buckets[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == math.inf:
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return math.nan


class Evaluator:
    def __init__(self, series: Series) -> None:
        self.series = series

    def instant(self, expr: str, at: float) -> Vector:
        """The instant vector (or a scalar as {frozenset(): x}) of `expr` at time `at`."""
        return self._eval(_Parser(expr).parse(), at)

    def fires(self, expr: str, at: float, for_s: float, step_s: float = 30.0) -> list[Labels]:
        """Label sets of the alerts firing at `at`: the expression returned them at every
        evaluation over the `for` duration."""
        steps = max(1, int(for_s // step_s) + 1)
        common: set[Labels] | None = None
        for k in range(steps):
            now = set(self.instant(expr, at - k * step_s))
            common = now if common is None else common & now
        return sorted(common or (), key=sorted)

    def _select(self, node: tuple, at: float) -> dict[Labels, list[tuple[float, float]]]:
        _, _, matchers, range_s = node
        window = range_s if range_s is not None else LOOKBACK_S
        out = {}
        for labels, points in self.series.samples.items():
            if _matches(labels, matchers):
                inside = [(t, v) for t, v in points if at - window < t <= at]
                if inside:
                    out[labels] = inside
        return out

    def _eval(self, node: tuple, at: float) -> Vector:
        kind = node[0]
        if kind == "num":
            return {frozenset(): node[1]}
        if kind == "sel":
            if node[3] is not None:
                raise PromQLError("a range vector outside rate()")
            return {labels: pts[-1][1] for labels, pts in self._select(node, at).items()}
        if kind == "call":
            return self._call(node[1], node[2], at)
        if kind == "agg":
            _, op, by, arg = node
            groups: dict[Labels, list[float]] = defaultdict(list)
            for labels, v in self._eval(arg, at).items():
                d = dict(labels)
                groups[frozenset((k, d[k]) for k in (by or ()) if k in d)].append(v)
            fn = sum if op == "sum" else max
            return {g: float(fn(vs)) for g, vs in groups.items()}
        if kind == "bin":
            return self._binary(node[1], node[2], node[3], at)
        raise PromQLError(f"unsupported node {kind}")

    def _call(self, fn: str, args: list[tuple], at: float) -> Vector:
        if fn == "rate":
            (arg,) = args
            if arg[0] != "sel" or arg[3] is None:
                raise PromQLError("rate() needs a range vector selector")
            out = {}
            for labels, pts in self._select(arg, at).items():
                r = _rate(pts)
                if r is not None:
                    out[_without_name(labels)] = r
            return out
        if fn == "absent":
            (arg,) = args
            if self._eval(arg, at):
                return {}
            eq = [(k, v) for k, op, v in arg[2] if op == "=" and k != "__name__"]
            return {frozenset(eq): 1.0}
        if fn == "histogram_quantile":
            q = self._eval(args[0], at)[frozenset()]
            buckets: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
            for labels, v in self._eval(args[1], at).items():
                d = dict(_without_name(labels))
                if "le" not in d:  # not a bucket: Prometheus ignores it too
                    continue
                le = float(d.pop("le"))
                buckets[frozenset(d.items())].append((le, v))
            return {g: _quantile(q, b) for g, b in buckets.items()}
        raise PromQLError(f"unsupported function {fn}")

    def _binary(self, op: str, left: tuple, right: tuple, at: float) -> Vector:
        lv, rv = self._eval(left, at), self._eval(right, at)
        if op == "or":
            seen = {_without_name(k) for k in lv}
            return {**lv, **{k: v for k, v in rv.items() if _without_name(k) not in seen}}
        scalar = rv.get(frozenset()) if right[0] == "num" else None
        if op in (">", "<", ">=", "<=", "==", "!="):
            if scalar is None:
                raise PromQLError("comparisons are supported against a number only")
            test = {
                ">": lambda a: a > scalar,
                "<": lambda a: a < scalar,
                ">=": lambda a: a >= scalar,
                "<=": lambda a: a <= scalar,
                "==": lambda a: a == scalar,
                "!=": lambda a: a != scalar,
            }[op]
            return {k: v for k, v in lv.items() if test(v)}
        out = {}
        rv_by = {_without_name(k): v for k, v in rv.items()}
        for k, a in lv.items():
            key = _without_name(k)
            if scalar is not None:
                b = scalar
            elif key in rv_by:
                b = rv_by[key]
            else:
                continue
            if op == "*":
                out[key] = a * b
            else:
                out[key] = a / b if b else (math.nan if a == 0 else math.copysign(math.inf, a))
        return out
