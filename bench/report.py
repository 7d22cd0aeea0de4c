"""Turning rounds into tables: the targets (PASS/MISS), every metric, the machine, the docs/performance.md part.

Ratios are docker-mirror / reference, of medians. Tables are Markdown, printed as they
go into docs/performance.md between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from bench.harness import Rounds
from bench.scenarios import IDLE
from bench.seed import MANY, MANY_MIB

MIRROR, REFERENCE = "docker-mirror", "reference"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

Results = dict[str, dict[str, Rounds]]      # scenario -> server label -> rounds


@dataclass(frozen=True)
class Target:
    title: str
    scenario: str
    metric: str
    op: str = ">="             # how the ratio must compare with ``ratio``
    ratio: float = 1.0
    exact: int | None = None   # instead: docker-mirror's value in every round
    limit: float | None = None  # instead: docker-mirror's value (the median) compared with ``op``

    def text(self) -> str:
        if self.exact is not None:
            return f"= {self.exact} (reference: {{ref}})"
        if self.limit is not None:
            return f"{self.op} {self.limit:g} (reference: {{ref}})"
        return f"ratio {self.op} {self.ratio:g}"

    def met(self, mirror: Rounds, ratio: float) -> bool:
        if self.exact is not None:
            return all(v == self.exact for v in mirror.values(self.metric))
        value = mirror.summary(self.metric) if self.limit is not None else ratio
        bound = self.limit if self.limit is not None else self.ratio
        return value >= bound if self.op == ">=" else value <= bound


def targets(big_mib: int) -> list[Target]:
    return [
        Target(f"warm GET of the {big_mib} MiB blob, MB/s", "warm", "MB/s", ">=", 1.0),
        Target("warm GET, share of the ceiling (a sendfile server of the same file, same curl)", "warm",
               "of ceiling", ">=", limit=0.9),
        Target("warm GET over TLS, MB/s", "warm-tls", "MB/s", ">=", 1.0),
        Target("32 clients, cached 1 MiB blob, req/s", "clients", "req/s", ">=", 2.0),
        Target("32 clients, p99 latency, ms", "clients", "p99 ms", "<=", 0.5),
        Target("cold GET, MB/s", "cold", "MB/s", ">=", 1.2),
        Target("cold GET, first byte, ms", "cold", "first byte ms", "<=", 1.0),
        Target("cold GET, CPU s/GB", "cold", "CPU s/GB", "<=", 1.0),
        Target("cold GET, upstream GETs of the blob", "cold", "upstream GETs", exact=1),
        Target("cold GET over a TLS upstream, MB/s", "cold-tls", "MB/s", ">=", 1.0),
        Target("cold GET over a TLS upstream, upstream GETs", "cold-tls", "upstream GETs", exact=1),
        Target("8 cold clients at once, wall s", "herd", "wall s", "<=", 1.0),
        Target("8 cold clients at once, upstream GETs", "herd", "upstream GETs", exact=1),
        Target(f"{MANY} clients, each a different cold {MANY_MIB} MiB blob, aggregate MB/s", "many", "MB/s", ">=", 1.0),
        Target(f"{MANY} cold blobs at once, upstream GETs per blob (most)", "many", "upstream GETs per blob", exact=1),
        Target(f"{IDLE:,} idle keep-alive connections, RSS growth, MiB", "idle", "RSS growth MiB", "<=", limit=50),
        Target(f"32 clients while {IDLE:,} idle connections are held, req/s vs without", "idle",
               "held / without", ">=", limit=0.9),
        Target("idle connections still open and answering at the end", "idle", "held still open", exact=IDLE),
        Target("peak RSS under 32 clients, MiB", "clients", "peak RSS MiB", "<=", 0.5),
        Target("docker pull, multi-layer image, empty cache, s", "docker-pull", "cold s", "<=", 1.0),
        Target("docker pull, multi-layer image, cached, s", "docker-pull", "warm s", "<=", 1.0),
    ]


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _shown(rounds: Rounds, metric: str) -> str:
    """The summary value; for upstream GETs that varied between rounds, their range too."""
    text = _number(rounds.summary(metric))
    if metric.startswith("upstream GETs") and min(rounds.values(metric)) != max(rounds.values(metric)):
        text += f" ({min(rounds.values(metric)):g}..{max(rounds.values(metric)):g})"
    return text


def _ratio(results: dict[str, Rounds], metric: str) -> float:
    reference = results[REFERENCE].summary(metric)
    return results[MIRROR].summary(metric) / reference if reference else float("nan")


def targets_table(results: Results, big_mib: int) -> str:
    lines = ["| measurement | docker-mirror | reference | ratio | target | result |", "|---|--:|--:|--:|---|---|"]
    for target in targets(big_mib):
        if target.scenario not in results:
            continue
        pair = results[target.scenario]
        ratio = _ratio(pair, target.metric)
        goal = target.text().format(ref=_shown(pair[REFERENCE], target.metric))
        verdict = "PASS" if target.met(pair[MIRROR], ratio) else "MISS"
        lines.append(f"| {target.title} | {_shown(pair[MIRROR], target.metric)} | "
                     f"{_shown(pair[REFERENCE], target.metric)} | {ratio:.2f} | {goal} | {verdict} |")
    return "\n".join(lines)


def all_metrics_table(results: Results, titles: dict[str, str]) -> str:
    lines = ["| scenario | metric | docker-mirror | reference | ratio |", "|---|---|--:|--:|--:|"]
    for name, pair in results.items():
        for i, metric in enumerate(pair[MIRROR].metrics()):
            scenario = f"**{name}**: {titles[name]}" if i == 0 else ""
            lines.append(f"| {scenario} | {metric} | {_shown(pair[MIRROR], metric)} | "
                         f"{_shown(pair[REFERENCE], metric)} | {_ratio(pair, metric):.2f} |")
    return "\n".join(lines)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    return (f"{model}, {os.cpu_count()} cores, {memory / 1024 / 1024:.0f} GiB RAM, "
            f"Linux {platform.release()} {platform.machine()}")


def replace_readme(readme: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Put ``text`` between the markers (the bench table's by default) of ``readme``; nothing else changes."""
    content = readme.read_text()
    head, found, rest = content.partition(begin + "\n")
    _, found_end, tail = rest.partition(end)
    if not (found and found_end):
        raise ValueError(f"{readme}: markers {begin} / {end} not found")
    readme.write_text(f"{head}{begin}\n{text.rstrip()}\n{end}{tail}")
