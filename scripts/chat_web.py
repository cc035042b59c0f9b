"""Serve the chat UI and an OpenAI-compatible API: http://127.0.0.1:8000 (one worker per GPU, one on a CPU).

    python -m scripts.chat_web                 # the most trained model available (rl > sft > base)
    python -m scripts.chat_web -i sft --port 8080 --slots 16
    python -m scripts.chat_web --model sft --model rl --model base:d12:2000   # several, the first is the default
    NANOCHAT_API_KEY=secret python -m scripts.chat_web --host 0.0.0.0   # reachable from the network, with a key

Only this machine can reach it unless --host says otherwise; exposing it without an API key prints a warning.
Without a key it answers only requests addressed to localhost, 127.0.0.1, [::1], the --host address and the names
given with --allowed-host (a web page on a DNS-rebinding domain must not drive it).

Endpoints: GET / (the chat page), POST /chat/completions (the page's stream), POST /v1/chat/completions
(OpenAI-compatible; its `model` picks one of the --model checkpoints), POST /v1/completions (plain text, for base
models), GET /v1/models, GET /health, GET /stats, GET /metrics (Prometheus), GET /docs (the API, offline). One JSON
access-log line per request goes to stderr; SIGTERM drains the requests in flight (--drain-timeout) and exits 0.
"""

import argparse
import os
import warnings

import torch

from nanochat.attention import kernel_summary
from nanochat.checkpoint import PHASE_DIRS, describe_model, load_chat_model
from nanochat.common import (UserError, autodetect_device_type, cuda_unusable_reason, get_compute_dtype, print0,
                             run_cli)
from nanochat.sandbox.execution import allow_unsafe_python_tool, python_tool_banner
from nanochat.serving.scheduler import BatchScheduler
from nanochat.serving.metrics import log_access_to_stderr
from nanochat.serving.server import (CLIENT_LIMIT, DRAIN_TIMEOUT, LIMITS, READ_TIMEOUT, ServedModel, create_app,
                                     listen, serve_http)


def parse_model(spec: str) -> tuple[str, str | None, int | None]:
    """--model SOURCE[:TAG[:STEP]] → (source, tag or None, step or None): 'sft', 'base:d12', 'rl:d12:700'."""
    parts = spec.split(":")
    if len(parts) > 3 or parts[0] not in PHASE_DIRS or "" in parts[1:]:
        raise UserError(f"--model {spec!r} must be SOURCE[:TAG[:STEP]] with SOURCE one of {', '.join(PHASE_DIRS)} "
                        "(e.g. sft, base:d12, rl:d12:700)")
    source, tag, step = parts + [None] * (3 - len(parts))
    if step is not None and not step.isdigit():
        raise UserError(f"--model {spec!r}: the step must be a number, got {step!r}")
    return source, tag, int(step) if step is not None else None


def model_ids(metas: list) -> list[str]:
    """nanochat-TAG-STAGE for each model, with -STEP added where two would share a name."""
    names = [f"nanochat-{m.model_tag}-{m.phase}" for m in metas]
    ids = [f"{n}-{m.step}" if names.count(n) > 1 else n for n, m in zip(names, metas)]
    if len(set(ids)) != len(ids):
        raise UserError(f"the same checkpoint is given twice among --model ({', '.join(ids)}): give each once")
    return ids


def web_about(meta) -> dict:
    """What /health and /v1/models say about a model beside its id and context, for the page's header."""
    description, expectation = describe_model(meta)
    return {"stage": meta.phase, "tag": meta.model_tag, "step": meta.step, "description": description,
            "expectation": expectation}


def say_uncaptured_decoding(workers: list[BatchScheduler]) -> None:
    """Capture each worker's one-row decode step now, and say once, at start, where that fails: its steps would run
    uncaptured (correct, but each token launches every kernel itself, several times slower)."""
    for worker in workers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said below, in one line
            failure = worker.decoder.check_capture()
        if failure:
            print0(f"warning: decode steps on {worker.cache.k.device} run without CUDA graphs, several times slower "
                   f"(capture failed: {failure})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Web chat UI + OpenAI-compatible API for a nanochat model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--source", choices=["sft", "rl", "base"], default=None,
                   help="which checkpoints (default: rl, else sft, else base)")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--model", action="append", default=[], metavar="SOURCE[:TAG[:STEP]]",
                   help="serve this checkpoint (repeatable: several models behind one API, the first the default; "
                        "a request's `model` picks one by the id /v1/models lists), e.g. --model sft --model base:d12; "
                        "in place of -i/--model-tag/--step")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $NANOCHAT_API_KEY; the variable keeps the key "
                        "out of the process list)")
    p.add_argument("--client-limit", type=int, default=CLIENT_LIMIT,
                   help="concurrent generations per client address")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="without an API key, also answer requests addressed to NAME (the Host header; repeatable)")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT,
                   help="seconds a client has to send a request's headers, and again its body")
    p.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT,
                   help="on SIGTERM, seconds the requests in flight get to finish (new ones get 503) before they are "
                        "ended with a final 'shutdown' event")
    p.add_argument("--unsafe-python-tool", action="store_true",
                   help="run the model's Python tool even where the kernel sandbox is unavailable (rlimits only)")
    p.add_argument("--temperature", type=float, default=0.8, help="default when a request gives none")
    p.add_argument("--top-k", type=int, default=50, help="default when a request gives none (0 = no top-k)")
    p.add_argument("--max-tokens", type=int, default=512, help="default when a request gives none")
    p.add_argument("--slots", type=int, default=8, help="concurrent sequences per worker (continuous batching)")
    p.add_argument("--prefix-cache", type=float, default=0.5,
                   help="memory kept for reusing the keys and values of earlier prompts (the conversation so far, a "
                        "shared system prompt), as a fraction of the slots' KV cache; least recently used goes "
                        "first (0 = off)")
    p.add_argument("--num-gpus", type=int, default=None, help="workers on CUDA (default: every visible GPU)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and the model, then exit")
    args = p.parse_args(argv)
    for flag, key in (("--temperature", "temperature"), ("--top-k", "top_k"), ("--max-tokens", "max_tokens")):
        low, high = LIMITS[key]
        if not low <= getattr(args, key) <= high:
            raise UserError(f"{flag} must be between {low} and {high}")
    if args.slots < 1 or not 0 <= args.port < 65536 or args.client_limit < 1:
        raise UserError("--slots and --client-limit must be >= 1 and --port within 0..65535")
    if not 0 <= args.prefix_cache <= 4:
        raise UserError(f"--prefix-cache must be between 0 (off) and 4 (a fraction of the KV cache), not "
                        f"{args.prefix_cache}")
    if not args.read_timeout > 0:
        raise UserError(f"--read-timeout must be a positive number of seconds, got {args.read_timeout}")
    if not args.drain_timeout >= 0:
        raise UserError(f"--drain-timeout must be 0 or more seconds, got {args.drain_timeout}")
    if args.model and (args.source or args.model_tag or args.step is not None):
        raise UserError("--model replaces -i/--model-tag/--step: give each checkpoint as --model SOURCE[:TAG[:STEP]]")
    specs = [parse_model(m) for m in args.model] or [(args.source, args.model_tag, args.step)]
    if args.unsafe_python_tool:
        allow_unsafe_python_tool()
    print0(python_tool_banner())
    loopback = args.host in ("127.0.0.1", "::1", "localhost")
    if not loopback and not args.api_key:
        print0(f"warning: --host {args.host} without an API key: anyone who can reach port {args.port} can use the "
               "model and its Python tool; set NANOCHAT_API_KEY (or --api-key). Without a key, only requests "
               "addressed to a loopback name, the --host address or an --allowed-host NAME are answered")

    device_type = args.device_type or autodetect_device_type()
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device-type=cuda but no usable CUDA GPU: {cuda_unusable_reason()}")
        devices = [torch.device("cuda", i) for i in range(args.num_gpus or torch.cuda.device_count())]
    else:
        devices = [torch.device(device_type)]
    dtype = get_compute_dtype(device_type)
    print0(kernel_summary(device_type, dtype))
    loaded_models = []  # (workers, tokenizer, meta) of each model
    for source, tag, step in specs:
        workers = []
        for device in devices:  # one model copy and one scheduler thread per model and device
            loaded = load_chat_model(source, device, tag, step, dry_run=args.dry_run)
            if loaded is None:
                return
            model, tokenizer, meta = loaded
            workers.append(BatchScheduler(model, tokenizer, slots=args.slots, dtype=dtype,
                                          prefix_cache=args.prefix_cache))
        loaded_models.append((workers, tokenizer, meta))
    ids = model_ids([meta for _, _, meta in loaded_models])
    served = [ServedModel(model_id, workers, tokenizer, web_about(meta))
              for model_id, (workers, tokenizer, meta) in zip(ids, loaded_models)]
    workers, name = [w for m in served for w in m.workers], ", ".join(m.id for m in served)
    say_uncaptured_decoding(workers)
    if args.dry_run:
        print0(f"chat_web dry run: {len(devices)} worker(s) × {args.slots} slots ready for {name}")
        for w in workers:
            w.shutdown()
        return
    wildcard, shown = args.host in ("0.0.0.0", "::"), f"[{args.host}]" if ":" in args.host else args.host
    allowed = args.allowed_host + ([] if wildcard else [shown])
    app = create_app([], None, defaults={"temperature": args.temperature, "top_k": args.top_k,
                                         "max_tokens": args.max_tokens},
                     api_key=args.api_key, client_limit=args.client_limit, allowed_hosts=allowed,
                     read_timeout=args.read_timeout, models=served)
    where = "" if loopback else " (every interface)" if wildcard else " (reachable from the network)"
    try:
        sock = listen(args.host, args.port)
    except UserError:
        for w in workers:
            w.shutdown()
        raise
    print0(f"serving {name} on http://{shown}:{args.port}{where} with {len(devices)} worker(s) × {args.slots} slots"
           f"{' each' if len(served) > 1 else ''}{', API key required' if args.api_key else ''}")
    log_access_to_stderr()
    try:
        serve_http(app, args.host, args.port, args.read_timeout, args.drain_timeout, sock)
    finally:
        for w in workers:
            w.shutdown()


if __name__ == "__main__":
    run_cli(main)
