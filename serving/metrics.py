"""The gateway's /metrics: every engine's Prometheus metrics merged into one exposition (each sample
labelled with its engine), and the gateway's own (engines up, restarts, requests refused by reason,
requests in flight). Parsing and writing the text format is prometheus_client's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Families:
    """A prometheus_client collector over metric families built elsewhere."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return iter(self.families)


def merge_families(texts: dict[str, str]) -> list[Metric]:
    """Several engines' Prometheus text as one list of families: each family once (its HELP and TYPE
    from the first engine that has it), with the samples of every engine labelled `engine`. vLLM
    labels its engine-core index `engine` too; that label becomes `vllm_engine`."""
    families: dict[str, Metric] = {}
    for engine, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = {
                    "engine": engine,
                    **{("vllm_engine" if k == "engine" else k): v for k, v in sample.labels.items()},
                }
                merged.samples.append(sample._replace(labels=labels))
    return list(families.values())


def merge_metrics(texts: dict[str, str], *own: Metric) -> str:
    """`merge_families` and the gateway's own families, in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*merge_families(texts), *own]))
    return generate_latest(registry).decode()


class GatewayCounters:
    """Requests the gateway refused before an engine saw them, by reason (concurrency, connections,
    engine_busy, header_timeout, body_timeout, body_too_large, media_type, limit, invalid,
    unauthorised), and the requests in flight now."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.rejected = Counter(
            "pangu_pi_rejected_requests", "Requests refused by the gateway before reaching an engine, by reason.",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self.in_flight = 0

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def families(self) -> list[Metric]:
        own = list(self.registry.collect())
        gauge = Metric("pangu_pi_requests_in_flight", "Requests the gateway is serving now.", "gauge")
        gauge.add_sample("pangu_pi_requests_in_flight", {}, self.in_flight)
        return [*own, gauge]

    def rejected_count(self, reason: str) -> float:
        return self.registry.get_sample_value("pangu_pi_rejected_requests_total", {"reason": reason}) or 0.0
