"""Serve the chat UI and an OpenAI-compatible API: http://localhost:8000 (one worker per GPU, one on a CPU).

    python -m scripts.chat_web                 # the most trained model available (rl > sft > base)
    python -m scripts.chat_web -i sft --port 8080 --slots 16
"""

import argparse

import torch

from nanochat.common import autocast_ctx, autodetect_device_type, get_compute_dtype, print0, run_cli
from nanochat.engine import BatchScheduler
from nanochat.server import create_app
from scripts.chat_cli import load_chat_model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Web chat UI + OpenAI-compatible API for a nanochat model.")
    p.add_argument("-i", "--source", choices=["sft", "rl", "base"], default=None)
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--temperature", type=float, default=0.8, help="default when a request gives none")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--slots", type=int, default=8, help="concurrent sequences per worker (continuous batching)")
    p.add_argument("--num-gpus", type=int, default=None, help="workers on CUDA (default: every visible GPU)")
    p.add_argument("--device-type", default="")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    if device_type == "cuda":
        devices = [torch.device("cuda", i) for i in range(args.num_gpus or torch.cuda.device_count())]
    else:
        devices = [torch.device(device_type)]
    dtype = get_compute_dtype(device_type)
    workers, tokenizer, name = [], None, "nanochat"
    for device in devices:
        model, tokenizer, meta, source = load_chat_model(args.source, device, args.model_tag, args.step)
        name = f"nanochat-{meta.get('model_tag') or meta['args'].get('model_tag') or 'model'}-{source}"
        workers.append(BatchScheduler(model, tokenizer, slots=args.slots,
                                      autocast=lambda: autocast_ctx(device_type, dtype)))
    if args.dry_run:
        print0(f"chat_web dry run: {len(workers)} worker(s) ready for {name}")
        return
    app = create_app(workers, tokenizer, name, {"temperature": args.temperature, "top_k": args.top_k,
                                                "max_tokens": args.max_tokens})
    import uvicorn
    print0(f"serving {name} on http://{'localhost' if args.host in ('0.0.0.0', '127.0.0.1') else args.host}:"
           f"{args.port} with {len(workers)} worker(s) × {args.slots} slots")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
