"""Serve the chat UI and an OpenAI-compatible API: http://localhost:8000 (one worker per GPU, one on a CPU).

    python -m scripts.chat_web                 # the most trained model available (rl > sft > base)
    python -m scripts.chat_web -i sft --port 8080 --slots 16

Endpoints: GET / (the chat page), POST /chat/completions (the page's stream), POST /v1/chat/completions
(OpenAI-compatible), GET /v1/models, GET /health, GET /stats.
"""

import argparse

import torch

from nanochat.common import UserError, autocast_ctx, autodetect_device_type, get_compute_dtype, print0, run_cli
from nanochat.scheduler import BatchScheduler
from nanochat.server import LIMITS, create_app
from scripts.chat_cli import load_or_warn, model_tag


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Web chat UI + OpenAI-compatible API for a nanochat model.")
    p.add_argument("-i", "--source", choices=["sft", "rl", "base"], default=None,
                   help="which checkpoints (default: rl, else sft, else base)")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--temperature", type=float, default=0.8, help="default when a request gives none")
    p.add_argument("--top-k", type=int, default=50, help="default when a request gives none (0 = no top-k)")
    p.add_argument("--max-tokens", type=int, default=512, help="default when a request gives none")
    p.add_argument("--slots", type=int, default=8, help="concurrent sequences per worker (continuous batching)")
    p.add_argument("--num-gpus", type=int, default=None, help="workers on CUDA (default: every visible GPU)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and the model, then exit")
    args = p.parse_args(argv)
    for flag, key in (("--temperature", "temperature"), ("--top-k", "top_k"), ("--max-tokens", "max_tokens")):
        low, high = LIMITS[key]
        if not low <= getattr(args, key) <= high:
            raise UserError(f"{flag} must be between {low} and {high}")
    if args.slots < 1 or not 0 <= args.port < 65536:
        raise UserError("--slots must be >= 1 and --port within 0..65535")

    device_type = args.device_type or autodetect_device_type()
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device-type=cuda but no CUDA GPU is visible; use --device-type=cpu")
        devices = [torch.device("cuda", i) for i in range(args.num_gpus or torch.cuda.device_count())]
    else:
        devices = [torch.device(device_type)]
    dtype = get_compute_dtype(device_type)
    workers, tokenizer, name = [], None, "nanochat"
    for device in devices:  # one model copy and one scheduler thread per device
        loaded = load_or_warn(args, device)
        if loaded is None:
            return
        model, tokenizer, meta, source = loaded
        name = f"nanochat-{model_tag(meta)}-{source}"
        workers.append(BatchScheduler(model, tokenizer, slots=args.slots,
                                      autocast=lambda: autocast_ctx(device_type, dtype)))
    if args.dry_run:
        print0(f"chat_web dry run: {len(workers)} worker(s) × {args.slots} slots ready for {name}")
        for w in workers:
            w.shutdown()
        return
    app = create_app(workers, tokenizer, name, {"temperature": args.temperature, "top_k": args.top_k,
                                                "max_tokens": args.max_tokens})
    import uvicorn
    shown = "localhost" if args.host in ("0.0.0.0", "127.0.0.1", "::") else args.host
    print0(f"serving {name} on http://{shown}:{args.port} with {len(workers)} worker(s) × {args.slots} slots")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        for w in workers:
            w.shutdown()


if __name__ == "__main__":
    run_cli(main)
