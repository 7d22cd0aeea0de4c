"""Rounds: every scenario runs on both mirrors in turn (A B A B ...), so noise hits both alike.

Each measurement runs inside a :class:`Monitor` watch of the server's process, which
gives its peak RSS and the CPU seconds it spent.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bench.monitor import Monitor, Usage
from bench.scenarios import Sample, Scenario, Setup
from bench.servers import Server, restart_empty

MiB = 1024 * 1024


@dataclass
class Rounds:
    """One scenario on one server: a sample and its resource usage per round."""

    samples: list[Sample] = field(default_factory=list)
    usage: list[Usage] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        if metric == "peak RSS MiB":
            return [u.peak_rss / MiB for u in self.usage]
        return [s.metrics[metric] for s in self.samples]

    def summary(self, metric: str) -> float:
        """The median over the rounds; for RSS the peak, for CPU the total over all bytes served."""
        if metric == "peak RSS MiB":
            return max(self.values(metric))       # the peak over the whole scenario
        if metric == "CPU s/GB":
            return sum(u.cpu for u in self.usage) / sum(s.served for s in self.samples) * 1e9
        return statistics.median(self.values(metric))

    def to_json(self) -> dict:
        return {"rounds": [{**s.metrics, "served_bytes": s.served, "peak_rss_bytes": u.peak_rss, "cpu_s": u.cpu}
                           for s, u in zip(self.samples, self.usage, strict=True)],
                "summary": {m: self.summary(m) for m in self.metrics()}}

    def metrics(self) -> list[str]:
        return [*self.samples[0].metrics, "peak RSS MiB", "CPU s/GB"]


def run(scenario: Scenario, servers: list[Server], setup: Setup, rounds: int,
        monitor: Monitor) -> dict[str, Rounds]:
    """``rounds`` rounds of ``scenario``, each on every server in turn; results by server label."""
    results = {server.label: Rounds() for server in servers}
    if scenario.prime:
        for server in servers:
            scenario.prime(setup, server)
    for number in range(1, rounds + 1):
        # which server goes first alternates: neither always meets the other's dirty page cache
        for server in (servers if number % 2 else servers[::-1]):
            if scenario.cold:
                restart_empty(server)
            elif scenario.fresh:
                server.stop()
                server.start()
            with monitor.watch(server.pid) as usage:
                sample = scenario.measure(setup, server)
            results[server.label].samples.append(sample)
            results[server.label].usage.append(usage)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in sample.metrics.items())
            print(f"  {scenario.name} round {number}/{rounds} {server.label}: {shown}, "
                  f"peak RSS {usage.peak_rss / MiB:.0f} MiB, CPU {usage.cpu:.2f} s", flush=True)
    return results
