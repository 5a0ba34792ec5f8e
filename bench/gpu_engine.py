"""GPU benchmark of the moderation engine on the real Qwen3-VL-8B architecture with random weights.

Builds ``Qwen3VLForConditionalGeneration`` from the real 8B config (moderation/engine/qwen3_vl_8b) with random
bf16 weights on the GPU, the real Qwen processor and tokenizer, and measures from image bytes to verdict:
a 512x512 JPEG, a ~30-token caption, every category scored, 96 generated tokens (forced: random weights stop
anywhere). In the same run it times two baselines: one ``generate`` per submission (batch 1), and plain
``generate`` on a left-padded batch. Prints a table: submissions/s, p50/p95 latency, peak GPU memory.

    python bench/gpu_engine.py --processor PATH [--batch 64] [--quantization none,int8]

``--processor`` is a folder with the Qwen3-VL processor (tokenizer, image processor, chat template): the
fixture model's folder works (``moderation fixture-model build``); its random tiny weights are not used.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moderation.engine import prompts  # noqa: E402
from moderation.engine.base import EngineRequest, ModelInfo  # noqa: E402
from moderation.engine.images import prepare_image  # noqa: E402
from moderation.engine.transformers_engine import TransformersEngine  # noqa: E402

CAPTION = (
    "Brand new iPhone 15 Pro Max, sealed in box, only $199 today! DM me now, shipping worldwide from our "
    "official store."
)
NEW_TOKENS = 96


def make_jpeg(seed: int, side: int = 512) -> bytes:
    """A noisy 512x512 JPEG (distinct per seed)."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(side // 8, side // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(pixels).resize((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_model(config_dir: Path, device: str, quantization: str) -> Any:
    """The 8B model with random weights (bf16), optionally int8 through bitsandbytes."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig.from_pretrained(config_dir)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.eval()
    if quantization == "int8":
        quantize_int8(model.model.language_model, device)
    return model


def quantize_int8(module: torch.nn.Module, device: str) -> None:
    """Swap every Linear of the language model for a bitsandbytes int8 one (LLM.int8, as MODERATION_QUANTIZATION=int8).

    The vision tower and the LM head stay bf16, as in the engine's BitsAndBytesConfig.
    """
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            new = bnb.nn.Linear8bitLt(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                has_fp16_weights=False,
                threshold=6.0,
            )
            new.weight = bnb.nn.Int8Params(
                child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False
            )
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.data.cpu(), requires_grad=False)
            setattr(module, name, new.to(device))
            del child
        else:
            quantize_int8(child, device)


def timed(fn: Callable[[], Any], device: str) -> float:
    """Wall time of fn, with the device synchronised before and after."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def row(name: str, n: int, total: float, latencies: list[float], device: str) -> dict[str, Any]:
    """One result row."""
    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    return {
        "mode": name,
        "submissions": n,
        "subs_per_s": n / total,
        "p50_s": statistics.median(lat),
        "p95_s": p95,
        "peak_gib": mem,
    }


def bench_naive(
    model: Any, processor: Any, jpegs: list[bytes], device: str, max_pixels: int
) -> dict[str, Any]:
    """The tutorial way: one generate call per submission, batch 1."""
    latencies = []

    def one(data: bytes) -> None:
        image = prepare_image(Image.open(io.BytesIO(data)), max_pixels, 1024)
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {
                        "type": "text",
                        "text": prompts.describe_question(CAPTION, prompts.DEFAULT_CATEGORIES, "en"),
                    },
                ],
            }
        ]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[image], return_tensors="pt", do_resize=False).to(device)
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    for data in jpegs:
        latencies.append(timed(lambda d=data: one(d), device))
    return row("naive generate, batch 1", len(jpegs), sum(latencies), latencies, device)


def bench_plain_batch(
    model: Any, processor: Any, jpegs: list[bytes], device: str, max_pixels: int, batch: int
) -> dict[str, Any]:
    """Plain generate on a left-padded batch."""
    processor.tokenizer.padding_side = "left"
    latencies: list[float] = []
    total = 0.0
    for start in range(0, len(jpegs), batch):
        chunk = jpegs[start : start + batch]

        def run(chunk: list[bytes] = chunk) -> None:
            images = [prepare_image(Image.open(io.BytesIO(d)), max_pixels, 1024) for d in chunk]
            messages = [
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image"},
                            {
                                "type": "text",
                                "text": prompts.describe_question(CAPTION, prompts.DEFAULT_CATEGORIES, "en"),
                            },
                        ],
                    }
                ]
                for _ in chunk
            ]
            texts = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = processor(text=texts, images=images, return_tensors="pt", padding=True, do_resize=False)
            model.generate(
                **inputs.to(device), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )

        elapsed = timed(run, device)
        total += elapsed
        latencies += [elapsed] * len(chunk)
    return row(f"plain generate, batch {batch}", len(jpegs), total, latencies, device)


def _request(data: bytes) -> EngineRequest:
    return EngineRequest(
        image=Image.open(io.BytesIO(data)), caption=CAPTION, categories=prompts.DEFAULT_CATEGORIES
    )


def bench_engine(engine: TransformersEngine, jpegs: list[bytes], device: str, batch: int) -> dict[str, Any]:
    """The engine end to end: JPEG bytes → decoded image → verdict scores and texts."""
    engine.moderate([_request(d) for d in jpegs[:batch]])  # warm-up: this size's graphs
    engine.profile = True
    engine.moderate([_request(d) for d in jpegs[:batch]])
    stages = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in engine.timings.items())
    print(f"engine stages at batch {batch}: {stages}", flush=True)
    engine.profile = False
    latencies: list[float] = []
    total = 0.0
    for start in range(0, len(jpegs), batch):
        chunk = jpegs[start : start + batch]

        def run(chunk: list[bytes] = chunk) -> None:
            requests = [_request(d) for d in chunk]
            results = engine.moderate(requests)
            assert len(results) == len(chunk)

        elapsed = timed(run, device)
        total += elapsed
        latencies += [elapsed] * len(chunk)
    return row(f"engine, batch {batch}", len(jpegs), total, latencies, device)


def force_new_tokens(engine: TransformersEngine, count: int) -> None:
    """Make every reply exactly ``count`` tokens long (random weights would stop anywhere)."""
    engine._max_new_tokens = engine._min_new_tokens = count
    engine._decoder.reply_end.min_tokens = count
    engine._decoder._eos_allowed_from_step.fill_(max(0, count - 1))  # read in place by captured graphs


def bench_shapes(engine: TransformersEngine, device: str, budget_gib: float, rounds: int) -> dict[str, Any]:
    """Batches of changing shapes (batch size, caption length): how much GPU memory the decode buffers keep.

    Production batches vary in size and in caption length (up to 2,048 tokens), and each (batch, length)
    bucket has its own buffers and CUDA graphs. This runs every combination, shuffled, ``rounds`` times
    with the decoder's byte budget at ``budget_gib`` and prints what the decoder holds and what the
    allocator reserved after each batch.
    """
    import random

    decoder = engine._decoder
    decoder.forget_all()
    torch.cuda.empty_cache()
    decoder.state_budget_bytes = int(budget_gib * 2**30)
    combos = [(batch, repeat) for batch in (1, 4, 8, 16, 32) for repeat in (1, 8, 20, 40)]
    random.Random(0).shuffle(combos)
    jpeg = make_jpeg(0)
    times: list[list[float]] = []
    peak_reserved = peak_held = 0
    for round_index in range(rounds):
        times.append([])
        for batch, repeat in combos:
            requests = [
                EngineRequest(
                    image=Image.open(io.BytesIO(jpeg)),
                    caption=" ".join([CAPTION] * repeat),
                    categories=prompts.DEFAULT_CATEGORIES,
                )
                for _ in range(batch)
            ]

            def run(requests: list[EngineRequest] = requests) -> None:
                engine.moderate(requests)

            elapsed = timed(run, device)
            times[-1].append(elapsed)
            held, reserved = decoder.held_state_bytes, torch.cuda.memory_reserved()
            peak_reserved, peak_held = max(peak_reserved, reserved), max(peak_held, held)
            print(
                f"budget {budget_gib:g} GiB, round {round_index + 1}: batch {batch:2d}, caption x{repeat:2d}: "
                f"{elapsed:6.2f} s, {len(decoder._states)} buckets kept, {held / 2**30:6.2f} GiB held, "
                f"{reserved / 2**30:6.2f} GiB reserved",
                flush=True,
            )
    return {
        "budget_gib": budget_gib,
        "shapes": len(combos),
        "rounds": rounds,
        "seconds_per_round": [round(sum(t), 2) for t in times],
        "peak_held_gib": round(peak_held / 2**30, 2),
        "peak_reserved_gib": round(peak_reserved / 2**30, 2),
        "buckets_kept_at_end": len(decoder._states),
    }


def kernel_table(engine: TransformersEngine, jpegs: list[bytes], limit: int) -> None:
    """Print the GPU kernels that took the most time in one batch (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    engine.moderate([_request(d) for d in jpegs])  # shapes of this batch size warmed up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.moderate([_request(d) for d in jpegs])
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=limit), flush=True)
    images = [engine._prepare(_request(d)) for d in jpegs]
    text = "<|vision_start|><|image_pad|><|vision_end|>"
    batch = engine._encode([text] * len(images), images)
    with torch.inference_mode():
        engine._vision(batch["pixel_values"], batch["image_grid_thw"])
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine._vision(batch["pixel_values"], batch["image_grid_thw"])
            torch.cuda.synchronize()
    print("vision tower alone:", flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=limit), flush=True)


def main() -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "moderation/engine/qwen3_vl_8b"))
    parser.add_argument("--processor", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="batches per batched mode")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step before capture")
    parser.add_argument("--plain-rounds", type=int, default=1, help="batches in the plain generate baseline")
    parser.add_argument("--naive", type=int, default=4, help="submissions in the naive baseline")
    parser.add_argument("--single", type=int, default=8, help="submissions judged alone")
    parser.add_argument("--modes", default="naive,plain,engine,single")
    parser.add_argument("--quantization", default="none", help="comma list of none,int8")
    parser.add_argument(
        "--engine-batches", help="comma list of batch sizes for the engine mode (default: --batch)"
    )
    parser.add_argument(
        "--kernels", type=int, default=0, help="print the N costliest GPU kernels of one batch"
    )
    parser.add_argument(
        "--memory-gib", type=float, help="cap this process's GPU memory (to see the engine adapt its batch)"
    )
    parser.add_argument(
        "--shape-budgets",
        default="6,1000",
        help="mode shapes: comma list of decode-buffer budgets in GiB to run the changing shapes under",
    )
    parser.add_argument("--shape-rounds", type=int, default=2, help="mode shapes: passes over the shapes")
    parser.add_argument(
        "--new-tokens", help="mode engine: comma list of reply lengths to force (default: 96)"
    )
    parser.add_argument("--json-out")
    args = parser.parse_args()
    from transformers import Qwen3VLProcessor

    device = args.device
    processor = Qwen3VLProcessor.from_pretrained(args.processor)
    caption_tokens = len(processor.tokenizer.encode(CAPTION))
    modes = set(args.modes.split(","))
    n = args.batch * args.rounds
    jpegs = [make_jpeg(i) for i in range(max(n, args.naive, args.single))]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    print(f"device: {name}; torch {torch.__version__}")
    print(
        f"caption tokens: {caption_tokens}; image 512x512 (256 visual tokens); {NEW_TOKENS} new tokens forced"
    )
    rows: list[dict[str, Any]] = []
    for quantization in args.quantization.split(","):
        model = build_model(Path(args.config), device, quantization)
        label = "bf16" if quantization == "none" else quantization
        engine = TransformersEngine(
            model,
            processor,
            info=ModelInfo(name="random-8b", revision="bench", prompt_version=prompts.PROMPT_VERSION),
            device=torch.device(device),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            image_max_pixels=512 * 512,
            image_min_pixels=32 * 32,
            use_cuda_graphs=quantization == "none",
            compile_decode=args.compile,
        )
        if args.memory_gib:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
        # Warm-up: kernels, allocator, cuBLAS handles, and the CUDA graphs of both batch sizes.
        started = time.perf_counter()
        engine.moderate([_request(jpegs[0])])
        engine.moderate([_request(d) for d in jpegs[: args.batch]])
        print(f"{label}: engine warm-up (graph capture) {time.perf_counter() - started:.1f}s", flush=True)
        reset = torch.cuda.reset_peak_memory_stats if device.startswith("cuda") else (lambda: None)
        if "naive" in modes:
            reset()
            rows.append(
                bench_naive(model, processor, jpegs[: args.naive], device, 512 * 512) | {"dtype": label}
            )
        if "plain" in modes:
            reset()
            rows.append(
                bench_plain_batch(model, processor, jpegs[:n], device, 512 * 512, args.batch)
                | {"dtype": label}
            )
        if args.kernels:
            kernel_table(engine, jpegs[: args.batch], args.kernels)
        if "engine" in modes:
            for new_tokens in [int(n) for n in (args.new_tokens or str(NEW_TOKENS)).split(",")]:
                force_new_tokens(engine, new_tokens)
                for size in [int(b) for b in (args.engine_batches or str(args.batch)).split(",")]:
                    if size * args.rounds > len(jpegs):
                        jpegs += [make_jpeg(i) for i in range(len(jpegs), size * args.rounds)]
                    reset()
                    row_of = bench_engine(engine, jpegs[: size * args.rounds], device, size)
                    row_of["mode"] += f", {new_tokens} tokens"
                    rows.append(row_of | {"dtype": label})
            force_new_tokens(engine, NEW_TOKENS)
        if "shapes" in modes:
            for budget in [float(b) for b in args.shape_budgets.split(",")]:
                print(json.dumps(bench_shapes(engine, device, budget, args.shape_rounds)), flush=True)
        if "single" in modes:
            reset()
            rows.append(bench_engine(engine, jpegs[: args.single], device, 1) | {"dtype": label})
        for r in rows:
            print(json.dumps(r), flush=True)
        if engine._fitting_batch is not None:
            print(
                f"{label}: the engine ran out of memory and now judges at most {engine._fitting_batch} at once"
            )
        del engine, model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print()
    print(f"{'mode':34} {'dtype':>6} {'subs/s':>8} {'p50 s':>8} {'p95 s':>8} {'peak GiB':>9}")
    for r in rows:
        print(
            f"{r['mode']:34} {r['dtype']:>6} {r['subs_per_s']:8.2f} {r['p50_s']:8.3f} {r['p95_s']:8.3f} "
            f"{r['peak_gib']:9.1f}"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
