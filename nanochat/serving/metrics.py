"""What whoever runs the server watches: Prometheus metrics (GET /metrics) and one access-log line per request.

Every app gets its own `CollectorRegistry`, so several apps in one process (the tests) never share counters.
Per-request figures (tokens, time to first token, time per token, finish reasons, tool calls) are recorded as the
scheduler's events pass through `ChoiceWatch`; the state of the workers (queue depth, batch occupancy, prefix
reuse) is read from their `status()` at scrape time, so nothing runs per token on the scheduler's behalf beyond a
counter increment.
"""

import json
import logging
import sys
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nanochat.sandbox.execution import REFUSED_PREFIX

access_log = logging.getLogger("nanochat.access")
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def outcome_of(reason: str) -> str:
    """A finish reason as a metric label: "stop", "length", "cancelled", "shutdown" or "error" (without its text)."""
    return "error" if reason.startswith("error") else reason


def tool_outcome(output: str) -> str:
    """What became of a tool call, from the output the model was shown (see engine.run_tool)."""
    if not output.startswith("Error:"):
        return "ok"
    if output.startswith("Error: timed out"):
        return "timeout"
    if output.startswith(f"Error: {REFUSED_PREFIX}"):
        return "refused"
    return "error"


class WorkersCollector:
    """Gauges and counters read from each worker's `status()` when /metrics is scraped, labelled by worker."""

    def __init__(self, workers: list):
        self.workers = workers

    def collect(self):
        queue = GaugeMetricFamily("nanochat_queue_depth", "Requests waiting for a slot", labels=["worker"])
        active = GaugeMetricFamily("nanochat_active_sequences", "Sequences in the batch", labels=["worker"])
        occupancy = GaugeMetricFamily("nanochat_batch_occupancy", "Share of the worker's slots in use (0..1)",
                                      labels=["worker"])
        hit_rate = GaugeMetricFamily("nanochat_prefix_cache_hit_rate", "Prompt tokens whose keys and values were "
                                     "reused rather than computed, over all prompt tokens looked up", labels=["worker"])
        used = GaugeMetricFamily("nanochat_prefix_cache_used_bytes", "KV memory holding reusable prefixes",
                                 labels=["worker"])
        capacity = GaugeMetricFamily("nanochat_prefix_cache_capacity_bytes", "KV memory set aside for reusable "
                                     "prefixes (--prefix-cache)", labels=["worker"])
        reused = CounterMetricFamily("nanochat_prefix_cache_reused_tokens", "Prompt tokens reused from the prefix "
                                     "cache", labels=["worker"])
        looked_up = CounterMetricFamily("nanochat_prefix_cache_prompt_tokens", "Prompt tokens looked up in the "
                                        "prefix cache", labels=["worker"])
        for i, worker in enumerate(self.workers):
            s, label = worker.status(), [str(i)]
            queue.add_metric(label, s.get("waiting", 0))
            active.add_metric(label, s.get("active", 0))
            if s.get("slots"):
                occupancy.add_metric(label, s.get("active", 0) / s["slots"])
            if prefixes := s.get("prefix_cache"):
                hit_rate.add_metric(label, prefixes["hit_rate"])
                used.add_metric(label, prefixes["used_bytes"])
                capacity.add_metric(label, prefixes["bytes"])
                reused.add_metric(label, prefixes["reused_tokens"])
                looked_up.add_metric(label, prefixes["prompt_tokens"])
        yield from (queue, active, occupancy, hit_rate, used, capacity, reused, looked_up)


class ServerMetrics:
    """The app's metrics, in its own registry; `exposition()` is the body of GET /metrics."""

    def __init__(self, workers: list, tokenizer):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("nanochat_requests", "Generations (choices) by how they finished",
                                ["outcome"], registry=registry)
        self.prompt_tokens = Counter("nanochat_prompt_tokens", "Prompt tokens of the generations that started "
                                     "(each choice counts its prompt)", registry=registry)
        self.generated_tokens = Counter("nanochat_generated_tokens", "Tokens generated (tool outputs included)",
                                        registry=registry)
        self.ttft = Histogram("nanochat_time_to_first_token_seconds", "From submission to a choice's first token",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.token_latency = Histogram("nanochat_time_per_output_token_seconds", "Between consecutive tokens of a "
                                       "choice", buckets=TOKEN_BUCKETS, registry=registry)
        self.tool_calls = Counter("nanochat_tool_calls", "Python tool calls by outcome (ok, error, timeout, "
                                  "refused)", ["outcome"], registry=registry)
        self.responses = Counter("nanochat_http_responses", "HTTP responses by method, route and status",
                                 ["method", "path", "status"], registry=registry)
        registry.register(WorkersCollector(workers))
        self.tokenizer = tokenizer
        self.output_start = tokenizer.encode_special("<|output_start|>")
        self.output_end = tokenizer.encode_special("<|output_end|>")

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestWatch:
    """The figures of one HTTP request's generations, for the metrics and its access-log line. `generated` is
    written by the scheduler thread only (all of a request's choices run on one worker)."""

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int):
        self.metrics, self.prompt_tokens, self.generated = metrics, prompt_tokens, 0

    def choice(self, sink) -> "ChoiceWatch":
        return ChoiceWatch(self, sink)


class ChoiceWatch:
    """An event sink in front of another (the `EventBridge`): records each event of one choice, then passes it on."""

    def __init__(self, request: RequestWatch, sink):
        self.request, self.metrics, self.sink = request, request.metrics, sink
        self.started, self.last, self.output = time.monotonic(), None, None

    def put(self, event: tuple) -> None:
        now, m = time.monotonic(), self.metrics
        if event[0] == "token":
            self.request.generated += 1
            m.generated_tokens.inc()
            if self.last is None:  # its prompt is in
                m.prompt_tokens.inc(self.request.prompt_tokens)
                m.ttft.observe(now - self.started)
            else:
                m.token_latency.observe(now - self.last)
            self.last = now
            self.watch_tool_output(event[1])
        elif event[0] == "done":
            m.requests.labels(outcome_of(event[1])).inc()
        self.sink.put(event)

    def watch_tool_output(self, token: int) -> None:
        """A tool call's output arrives as the forced tokens between <|output_start|> and <|output_end|>."""
        if token == self.metrics.output_start:
            self.output = []
        elif self.output is not None:
            if token == self.metrics.output_end:
                self.metrics.tool_calls.labels(tool_outcome(self.metrics.tokenizer.decode(self.output))).inc()
                self.output = None
            else:
                self.output.append(token)


def log_access_to_stderr() -> None:
    """Send the access log's lines, as they are, to stderr (the server's own loggers stay as uvicorn set them)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


class AccessLog:
    """ASGI middleware: one JSON line per request on the `nanochat.access` logger when its response has been sent
    (a stream when it ends): method, path, status, duration, client, and the prompt and generated tokens of a
    generation (from the `RequestWatch` a handler puts in `request.state.watch`). Never the prompt's text."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), 500  # a handler that dies before answering: uvicorn sends a 500
        state = scope.setdefault("state", {})

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"  # a route, not the raw path: bounded label values
            self.metrics.responses.labels(scope["method"], path, str(status)).inc()
            line = {"method": scope["method"], "path": scope["path"], "status": status,
                    "duration_s": round(time.monotonic() - started, 4),
                    "client": scope["client"][0] if scope.get("client") else None}
            if (watch := state.get("watch")) is not None:
                line.update(prompt_tokens=watch.prompt_tokens, generated_tokens=watch.generated)
            access_log.info(json.dumps(line))
