"""A small reader of the root Dockerfile: its stages and instructions, and of .dockerignore.

Enough of the Dockerfile syntax for what deploy/check.sh verifies (the project's own Dockerfile):
line continuations, comments, JSON and shell forms, ARG/ENV substitution of ${VAR} and $VAR,
`FROM image AS name`, and `COPY [--from=..] [--chown=..] src... dest`. Standard library only.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


@dataclass
class Instruction:
    keyword: str  # upper case, e.g. "COPY"
    args: str  # the rest of the instruction, continuations joined
    line: int  # first line, 1-based

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """Leading `--flag=value` options and the remaining words (JSON or shell form)."""
        text = self.args.strip()
        flags: dict[str, str] = {}
        while text.startswith("--"):
            token, _, text = text.partition(" ")
            name, _, value = token[2:].partition("=")
            flags[name] = value
            text = text.lstrip()
        if text.startswith("["):
            try:
                words = json.loads(text)
            except json.JSONDecodeError:
                words = shlex.split(text)
        else:
            words = shlex.split(text)
        return flags, [str(w) for w in words]

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of ENTRYPOINT/CMD, or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"line {self.line}: {self.keyword} must be a JSON list of strings")
        return value


@dataclass
class Stage:
    name: str | None
    base: str  # the FROM argument after substitution of global ARGs
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def find(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages if s.name]

    def chain(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, outermost first."""
        chain: list[Stage] = []
        stage = self.stage(name)
        while True:
            chain.insert(0, stage)
            if stage.base in self.stage_names():
                stage = self.stage(stage.base)
            else:
                return chain

    def targets(self, base_stage: str) -> list[Stage]:
        """Stages built FROM base_stage (directly), in file order."""
        return [s for s in self.stages if s.base == base_stage and s.name]


def substitute(text: str, variables: dict[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("plain")
        return variables.get(name, "")

    return _VAR.sub(repl, text)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines = text.splitlines()
    result: list[tuple[int, str]] = []
    buffer = ""
    start = 0
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped, as Docker does
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        result.append((start, buffer))
        buffer = ""
    if buffer:
        result.append((start, buffer))
    return result


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in _logical_lines(path.read_text()):
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = substitute(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name=name, base=base, line=line))
        elif not stages:
            if keyword == "ARG":
                key, _, default = args.partition("=")
                global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(Instruction(keyword, args, line))
    return Dockerfile(path=path, global_args=global_args, stages=stages)


def parse_env(args: str, variables: dict[str, str]) -> dict[str, str]:
    """`ENV a=1 b="two words"` (or the old `ENV key value` form) with substitution."""
    words = shlex.split(args, posix=True)
    if words and "=" not in words[0]:
        return {words[0]: substitute(" ".join(words[1:]), variables)}
    result: dict[str, str] = {}
    for word in words:
        key, _, value = word.partition("=")
        result[key] = substitute(value, {**variables, **result})
    return result


def copy_sources(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """COPY/ADD flags, sources and destination."""
    flags, words = instruction.flags_and_words()
    if len(words) < 2:
        raise ValueError(f"line {instruction.line}: {instruction.keyword} needs a source and a destination")
    return flags, words[:-1], words[-1]


# --- .dockerignore -------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern[i : i + 2] == "**":
                out += ".*"
                i += 2
                if i < len(pattern) and pattern[i] == "/":
                    out = out[:-2] + "(?:.*/)?"
                    i += 1
                continue
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.find("]", i)
            if end == -1:
                out += re.escape(c)
            else:
                out += pattern[i : end + 1]
                i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(f"^{out}$")


class DockerIgnore:
    """Docker's rules: patterns in order, the last match decides, `!` re-includes, and a pattern
    that matches a directory matches everything below it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:].strip()
            line = line.strip("/")
            while line.startswith("./"):
                line = line[2:]
            self.rules.append((negate, _pattern_regex(line)))

    @classmethod
    def load(cls, path: Path) -> DockerIgnore:
        return cls(path.read_text() if path.exists() else "")

    def excluded(self, relpath: str) -> bool:
        parts = relpath.strip("/").split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for negate, regex in self.rules:
            if any(regex.match(p) for p in prefixes):
                result = not negate
        return result
