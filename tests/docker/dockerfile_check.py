"""A small Dockerfile parser and the image rules MoNTA holds its Dockerfile to.

Parsing follows the Dockerfile reference for what this repository needs: a logical line is an
instruction keyword and its arguments; a trailing ``\\`` continues it on the next line; comment
lines (``#`` first) are dropped, also inside a continuation; parser directives and heredocs
(``RUN <<EOF``) are not supported and fail as unknown instructions. :func:`problems` returns one
message per broken rule (an empty list: the Dockerfile passes).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM",
                "HEALTHCHECK", "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL",
                "USER", "VOLUME", "WORKDIR"}
# caches that a non-root user must be able to write (set to /tmp/... or a declared volume)
CACHE_ENVS = ("HF_HOME", "TRITON_CACHE_DIR")
_SECRET_NAME = re.compile(r"(^|_)(API_?KEY|KEY|TOKEN|PASSWORD|PASSWD|SECRET)(_|$)", re.I)
_URL_USERINFO = re.compile(r"[a-z][a-z0-9+.-]*://([^/\s@]+)@", re.I)
_PIP = re.compile(r"^(?:\S*/)?(?:pip3?|python3?(?:\.\d+)? -m pip) install\b")
_PINNED = re.compile(r"^[A-Za-z0-9._-]+(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!*-]+(\s*;.*)?$")
# pip options followed by a value (the value is not a requirement)
_PIP_VALUED = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url",
               "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root",
               "--src", "--upgrade-strategy", "--platform", "--python-version",
               "--implementation", "--abi", "--trusted-host", "--cache-dir", "--progress-bar",
               "-C", "--config-settings", "--global-option", "--no-binary", "--only-binary",
               "-e", "--editable"}


class DockerfileSyntaxError(ValueError):
    """The text is not a Dockerfile this parser understands."""


@dataclass(frozen=True)
class Instruction:
    keyword: str
    """Upper-case instruction, one of :data:`INSTRUCTIONS`."""
    args: str
    """Everything after the keyword, continuations joined with a space."""
    line: int
    """1-based line where the instruction starts."""


def parse(text: str) -> list[Instruction]:
    """Logical instructions of ``text``; :class:`DockerfileSyntaxError` on what is not one."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not parts):
            continue  # comments and blank lines, also inside a continuation
        if not parts:
            start = number
        continued = stripped.endswith("\\")
        parts.append(stripped[:-1].strip() if continued else stripped)
        if continued:
            continue
        out.append(_instruction(" ".join(p for p in parts if p), start))
        parts = []
    if parts:
        raise DockerfileSyntaxError(f"line {start}: the file ends inside a line continuation")
    if not out:
        raise DockerfileSyntaxError("no instructions")
    first = next((i for i in out if i.keyword != "ARG"), None)
    if first is None or first.keyword != "FROM":
        raise DockerfileSyntaxError("the first instruction (after ARGs) must be FROM")
    return out


def _instruction(logical: str, line: int) -> Instruction:
    keyword, _, args = logical.partition(" ")
    if keyword.upper() not in INSTRUCTIONS:
        raise DockerfileSyntaxError(f"line {line}: unknown instruction {keyword!r}")
    if not args.strip():
        raise DockerfileSyntaxError(f"line {line}: {keyword.upper()} has no arguments")
    return Instruction(keyword.upper(), args.strip(), line)


def env_pairs(instruction: Instruction) -> list[tuple[str, str | None]]:
    """``ENV``/``ARG`` name-value pairs (``ENV A=1 B=2``, legacy ``ENV A value``, ``ARG A``)."""
    words = shlex.split(instruction.args)
    if instruction.keyword == "ENV" and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    pairs = []
    for word in words:
        name, eq, value = word.partition("=")
        pairs.append((name, value if eq else None))
    return pairs


def _from_image(instruction: Instruction, args: dict[str, str]) -> str:
    words = [w for w in instruction.args.split() if not w.startswith("--")]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])


def _pip_requirements(command: str) -> tuple[list[str], list[str]]:
    """(requirements, -r files) of one ``pip install`` command."""
    words = shlex.split(command)
    words = words[words.index("install") + 1:]
    requirements, files = [], []
    i = 0
    while i < len(words):
        word = words[i]
        option, eq, value = word.partition("=")
        if option in ("-r", "--requirement"):
            files.append(value if eq else words[i + 1] if i + 1 < len(words) else "")
        if word in ("-e", "--editable") and i + 1 < len(words):
            requirements.append(words[i + 1])  # editable: must be a local path too
        if word in _PIP_VALUED and not eq:
            i += 2
            continue
        if not word.startswith("-"):
            requirements.append(word)
        i += 1
    return requirements, files


def _is_local(requirement: str) -> bool:
    return requirement.startswith((".", "/"))


def _unpinned_lines(path: Path) -> list[str]:
    bad = []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#") and not _PINNED.match(line):
            bad.append(line)
    return bad


def problems(text: str, context: Path | None = None) -> list[str]:
    """Every rule ``text`` breaks; ``context`` is the build context (for ``pip install -r``)."""
    try:
        instructions = parse(text)
    except DockerfileSyntaxError as error:
        return [f"does not parse: {error}"]
    found: list[str] = []
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    stages: set[str] = set()
    volumes: list[str] = []
    workdir = None
    for ins in instructions:
        where = f"line {ins.line}"
        if ins.keyword in ("ENV", "ARG"):
            for name, value in env_pairs(ins):
                if _SECRET_NAME.search(name):
                    found.append(f"{where}: {ins.keyword} {name} looks like a secret; pass "
                                 f"secrets at run time (or with build secrets), never in the image")
                if value is not None:
                    (env if ins.keyword == "ENV" else args)[name] = value
        if ins.keyword == "FROM":
            image = _from_image(ins, args)
            words = ins.args.split()
            if len(words) >= 3 and words[-2].upper() == "AS":
                stages.add(words[-1].lower())
            name = image.rsplit("/", 1)[-1]
            if "$" in image:
                found.append(f"{where}: FROM {image}: the base image is not a fixed value")
            elif "@sha256:" in image or image.lower() in stages:
                pass
            elif ":" not in name or name.endswith(":latest"):
                found.append(f"{where}: FROM {image}: pin the base image to an explicit tag "
                             f"(not latest)")
            workdir = None  # a new stage starts without our WORKDIR
        if ins.keyword == "WORKDIR":
            workdir = ins.args
        if ins.keyword == "VOLUME":
            volumes += re.findall(r"[^\s\[\]\",]+", ins.args)
        for userinfo in _URL_USERINFO.findall(ins.args):
            if ":" in userinfo or userinfo.lower() != "git":
                found.append(f"{where}: a URL carries credentials ({userinfo.split(':')[0]}@...)")
        if re.search(r"(--chown[= ]|\bchown\s+(-\S+\s+)*)\d+", ins.args):
            found.append(f"{where}: chown to a hard-coded uid; the container runs as the "
                         f"caller's uid (docker run --user), so make paths writable instead")
        if ins.keyword == "RUN":
            for command in re.split(r"&&|\|\||;|\|", ins.args):
                command = command.strip()
                if _PIP.match(command):
                    found += _pip_problems(command, where, context, workdir)
    if workdir is None:
        found.append("no WORKDIR in the final stage")
    for name in CACHE_ENVS:
        value = env.get(name)
        if value is None:
            found.append(f"ENV {name} is not set: a non-root user needs a writable cache")
        elif not (value.startswith("/tmp/") or any(value.startswith(v.rstrip("/") + "/")
                                                   or value == v for v in volumes)):
            found.append(f"ENV {name}={value} is neither under /tmp nor a declared VOLUME")
    return found


def _pip_problems(command: str, where: str, context: Path | None, workdir: str | None):
    requirements, files = _pip_requirements(command)
    found = [f"{where}: `{command}` installs {r!r} without an exact version (==)"
             for r in requirements if not _is_local(r) and not _PINNED.match(r)]
    for name in files:
        path = _context_path(name, context, workdir)
        if path is None:
            found.append(f"{where}: cannot check the pins of -r {name} (not in the build "
                         f"context)")
        else:
            found += [f"{where}: {name} has an unpinned requirement {line!r}"
                      for line in _unpinned_lines(path)]
    return found


def _context_path(name: str, context: Path | None, workdir: str | None) -> Path | None:
    """The build-context file behind a container path (COPY keeps relative layout here)."""
    if context is None or not name:
        return None
    if workdir and name.startswith(workdir.rstrip("/") + "/"):
        name = name[len(workdir.rstrip("/")) + 1:]
    path = context / name.lstrip("/")
    return path if path.is_file() else None
