"""The metric names a PromQL expression reads, and the names a /metrics page exposes.

    metric_names('sum by (job) (rate(tsunagu_bus_published_total{topic="x"}[5m]))')
        -> {"tsunagu_bus_published_total"}

A small scanner, not a full parser (promtool checks the syntax): it skips strings, label matchers
({...}), ranges and subqueries ([...]), numbers and durations, the label lists of by/without/on/
ignoring/group_left/group_right, keywords, and names followed by "(" (functions and aggregations);
every other identifier is a metric name. A {__name__="..."} matcher counts as a name too.
Grafana's $__rate_interval-style variables must be replaced first (grafana_to_promql).
"""

from __future__ import annotations

import re

KEYWORDS = {"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
}
# Series Prometheus makes itself for every target or rule; no service exports them.
SYNTHETIC = {
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
    "ALERTS",
    "ALERTS_FOR_STATE",
}

_IDENT_START = re.compile(r"[A-Za-z_:]")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?[A-Za-z0-9_]*")
_MATCHER = re.compile(r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)""")
# Grafana's interval variables, in both spellings.
_GRAFANA_INTERVAL = re.compile(r"\$\{?__(?:rate_interval|interval|range)(?:_ms|_s)?\}?")


class PromQLError(ValueError):
    pass


def grafana_to_promql(expr: str, interval: str = "5m") -> str:
    """Replace Grafana's interval variables by a duration; other $variables are left (they belong
    inside label matcher strings, where any text is valid)."""
    return _GRAFANA_INTERVAL.sub(interval, expr)


def variable_query_expr(query: str) -> str | None:
    """The PromQL inside a Grafana Prometheus variable query: label_values(expr, label) and
    query_result(expr) -> expr; label_values(label), label_names() and metrics() -> None (they read
    no series); anything else is PromQL itself."""
    match = re.fullmatch(r"\s*label_values\((.*)\)\s*", query, re.S)
    if match:
        args = match.group(1)
        depth = 0
        for i in range(len(args) - 1, -1, -1):
            if args[i] in ")}]":
                depth += 1
            elif args[i] in "({[":
                depth -= 1
            elif args[i] == "," and depth == 0:
                return args[:i].strip()
        return None
    match = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S)
    if match:
        return match.group(1)
    if re.match(r"\s*(label_names|metrics)\(", query):
        return None
    return query


def _skip_string(text: str, i: int) -> int:
    quote = text[i]
    j = i + 1
    while j < len(text):
        if text[j] == "\\" and quote != "`":
            j += 2
            continue
        if text[j] == quote:
            return j + 1
        j += 1
    raise PromQLError(f"unterminated string at {i}: {text[i : i + 30]!r}")


def _matchers(text: str, i: int) -> tuple[int, list[tuple[str, str, str]]]:
    """Parse {...} starting at text[i] == '{'; returns the end index and the matchers."""
    j = i + 1
    found: list[tuple[str, str, str]] = []
    while True:
        while j < len(text) and text[j] in " \t\r\n,":
            j += 1
        if j >= len(text):
            raise PromQLError(f"unterminated label matchers at {i}")
        if text[j] == "}":
            return j + 1, found
        match = _MATCHER.match(text, j)
        if not match:
            raise PromQLError(f"bad label matcher at {j}: {text[j : j + 30]!r}")
        label, op, value = match.groups()
        found.append((label, op, value[1:-1]))
        j = match.end()


def _skip_brackets(text: str, i: int) -> int:
    """Skip [...] (a range or subquery: durations only) starting at text[i] == '['."""
    end = text.find("]", i)
    if end < 0:
        raise PromQLError(f"unterminated range at {i}")
    return end + 1


def _next_significant(text: str, i: int) -> int:
    while i < len(text):
        if text[i].isspace():
            i += 1
        elif text[i] == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end + 1
        else:
            break
    return i


def _skip_parens(text: str, i: int) -> int:
    """Skip a (...) label list starting at text[i] == '('."""
    end = text.find(")", i)
    if end < 0:
        raise PromQLError(f"unterminated label list at {i}")
    return end + 1


def _word_at(text: str, i: int) -> str:
    match = _IDENT.match(text, i)
    return match.group(0).lower() if match else ""


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects. Raises PromQLError on what it cannot read,
    including a name given only by a regular expression ({__name__=~"..."})."""
    names: set[str] = set()
    depth = 0
    i = 0
    text = expr
    while True:
        i = _next_significant(text, i)
        if i >= len(text):
            break
        char = text[i]
        if char in "\"'`":
            i = _skip_string(text, i)
        elif char == "{":
            i, matchers = _matchers(text, i)
            for label, op, value in matchers:
                if label != "__name__":
                    continue
                if op != "=":
                    raise PromQLError(f"metric name by {op} {value!r}: cannot tell which metrics it reads")
                names.add(value)
        elif char == "[":
            i = _skip_brackets(text, i)
        elif char == "(":
            depth += 1
            i += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise PromQLError(f"unbalanced ) at {i}")
            i += 1
        elif char.isdigit() or (char == "." and i + 1 < len(text) and text[i + 1].isdigit()):
            match = _NUMBER.match(text, i)
            assert match is not None
            i = match.end()
        elif _IDENT_START.match(char):
            match = _IDENT.match(text, i)
            assert match is not None
            word = match.group(0)
            i = match.end()
            after = _next_significant(text, i)
            following = text[after] if after < len(text) else ""
            lower = word.lower()
            if lower in LABEL_LIST_KEYWORDS:
                # by (a, b) / on (a) / group_left (c) ; group_left without a list is valid too
                if following == "(":
                    i = _skip_parens(text, after)
            elif lower in KEYWORDS:
                pass
            elif following == "(":
                pass  # a function or an aggregation: its "(" is counted by the next round
            elif word in AGGREGATIONS and _word_at(text, after) in ("by", "without"):
                pass  # sum by (...) (...): the label list is skipped with its keyword
            else:
                names.add(word)
        elif char in "+-*/%^=!<>,@:;":
            i += 1
        else:
            raise PromQLError(f"unexpected {char!r} at {i}: {text[max(0, i - 20) : i + 20]!r}")
    if depth != 0:
        raise PromQLError("unbalanced parentheses")
    return names


def exposed_names(exposition: str) -> set[str]:
    """Sample names a Prometheus text exposition (a /metrics page) can produce, including those of
    families declared by # TYPE with no samples yet (labelled metrics not used so far)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                names |= _family_samples(parts[2], parts[3])
            continue
        match = _IDENT.match(line)
        if match:
            names.add(match.group(0))
    return names


def _family_samples(name: str, kind: str) -> set[str]:
    if kind == "counter":
        base = name.removesuffix("_total")
        return {f"{base}_total", f"{base}_created"}
    if kind in ("histogram", "gaugehistogram"):
        return {name, f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
    if kind == "summary":
        return {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
    if kind == "info":
        return {name, f"{name}_info"}
    return {name}
