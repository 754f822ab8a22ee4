"""The per-call series, counted by the data plane (criproxy._native, lock-free atomics) and
served here under the `criproxy_*` names: a prometheus-client collector that reads one snapshot
per scrape.

| series | type | labels |
| --- | --- | --- |
| criproxy_calls_total | counter | method, code |
| criproxy_calls_in_flight | gauge | method |
| criproxy_call_duration_seconds | histogram | method, code |
| criproxy_runtime_duration_seconds | histogram | method |
| criproxy_proxy_duration_seconds | histogram | method |
| criproxy_streams_active | gauge | method |
| criproxy_stream_messages_total | counter | method |

A method appears once it had a call (the data plane has a slot for every CRI method and
"other"; idle ones are left out, as prometheus-client leaves out children never used).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Snapshot = dict[str, Any]


def _bound(value: float) -> str:
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]  # the `le` text prometheus-client writes
    return text


def _buckets(bounds: Sequence[float], cumulative: Sequence[int]) -> list[tuple[str, float]]:
    return [(_bound(b), float(c)) for b, c in zip(bounds, cumulative, strict=False)] + [
        ("+Inf", float(cumulative[-1]))]


class NativeCallCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        bounds: list[float] = s["buckets"]
        calls = CounterMetricFamily("criproxy_calls", "CRI calls finished, by gRPC status code",
                                    labels=["method", "code"])
        duration = HistogramMetricFamily("criproxy_call_duration_seconds", "Whole CRI call, as the caller sees it",
                                         labels=["method", "code"])
        for method, code, count, cumulative, total in s["calls"]:
            calls.add_metric([method, code], count)
            duration.add_metric([method, code], _buckets(bounds, cumulative), total)
        in_flight = GaugeMetricFamily("criproxy_calls_in_flight", "CRI calls being served now", labels=["method"])
        runtime = HistogramMetricFamily("criproxy_runtime_duration_seconds", "Time a call waited on the runtime",
                                        labels=["method"])
        proxy = HistogramMetricFamily("criproxy_proxy_duration_seconds", "Time the proxy added to a call",
                                      labels=["method"])
        streams = GaugeMetricFamily("criproxy_streams_active", "Server streams open now", labels=["method"])
        messages = CounterMetricFamily("criproxy_stream_messages", "Messages relayed on server streams",
                                       labels=["method"])
        for method, active, (rt_buckets, rt_sum), (px_buckets, px_sum), open_streams, relayed in s["methods"]:
            if px_buckets[-1] == 0 and active == 0:
                continue  # never called
            in_flight.add_metric([method], active)
            runtime.add_metric([method], _buckets(bounds, rt_buckets), rt_sum)
            proxy.add_metric([method], _buckets(bounds, px_buckets), px_sum)
            if open_streams or relayed:
                streams.add_metric([method], open_streams)
                messages.add_metric([method], relayed)
        yield from (calls, in_flight, duration, runtime, proxy, streams, messages)
