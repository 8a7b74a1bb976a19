"""Device check for issue 25, second part: guided decoding's cost per decode step at 16, 64 and 256
rows, SOLAR/EEVE 10.7B's shape with random weights, the bundled tokenizer's vocabulary and the action
schema's grammar (inputs: bench/device/prepare.py). Per batch size: the step free, guided with the
mask filled while the GPU runs the forward, guided with it filled after, half and half. Eager HF steps
(a CUDA-graph replay of transformers' static cache crashed in cuGraphLaunch and is left out)."""

import json
import os
import statistics
import sys
import time
import traceback

import torch
import xgrammar as xgr
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, StaticCache

HERE = os.environ.get("GUIDED_INPUTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "inputs")
SMALL = len(sys.argv) > 1 and sys.argv[1] == "small"
DEV = "cuda"
VOCAB = 49152
PROMPT = 16 if SMALL else 256
STEPS = 5 if SMALL else 32
REPEATS = 1 if SMALL else 2
BATCHES = [4] if SMALL else [16, 64, 256]
SHAPE = (
    dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if SMALL
    else dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
)


def sync() -> None:
    torch.cuda.synchronize()


def eager_step(model, b: int, gen):
    """The prefill, then a step function: one eager forward of the batch's next tokens."""
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + 8 + (1 + REPEATS * 4) * STEPS)
    ids = torch.zeros(b, 1, dtype=torch.long, device=DEV)
    held = {}
    with torch.no_grad():
        model(
            input_ids=torch.randint(0, VOCAB, (b, PROMPT), device=DEV, generator=gen),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )

    def step() -> None:
        with torch.no_grad():
            held["logits"] = model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    return step, ids, lambda: held["logits"]


def run(step, ids, logits_out, compiled, mode: str, b: int, gen) -> dict:
    rows = [] if mode == "free" else list(range(b)) if mode != "mixed" else list(range(0, b, 2))
    idx = rows if mode == "mixed" else None
    matchers = [xgr.GrammarMatcher(compiled) for _ in rows]
    batch = xgr.BatchGrammarMatcher()
    bitmask = xgr.allocate_token_bitmask(b, VOCAB).pin_memory()
    fill_s, rejected = 0.0, 0
    sync()
    started = time.perf_counter()
    for _ in range(STEPS):
        step()
        if rows:
            if mode == "guided_serial":
                sync()
            t = time.perf_counter()
            batch.batch_fill_next_token_bitmask(matchers, bitmask, indices=idx)
            fill_s += time.perf_counter() - t
        logits = logits_out()[:, -1].float()
        if rows:
            xgr.apply_token_bitmask_inplace(logits, bitmask.to(DEV, non_blocking=True), indices=idx)
        nxt = torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1, generator=gen)
        tokens = nxt[:, 0].tolist()
        if rows:
            rejected += batch.batch_accept_token(matchers, [tokens[r] for r in rows]).count(False)
            for m in matchers:
                if m.is_terminated():
                    m.reset()
        ids.copy_(nxt)
    sync()
    return {
        "step_ms": (time.perf_counter() - started) / STEPS * 1000,
        "fill_ms": fill_s / STEPS * 1000,
        "rejected": rejected,
    }


def main() -> None:
    result = {
        "device": torch.cuda.get_device_name(),
        "prompt_tokens": PROMPT,
        "decode_steps": STEPS,
        "repeats": REPEATS,
        "vocab": VOCAB,
        "shape": "solar_eeve_10_7b" if not SMALL else "tiny",
    }
    tok = AutoTokenizer.from_pretrained(os.path.join(HERE, "tok"))
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB), max_threads=8)
    with open(os.path.join(HERE, "schema.json")) as f:
        compiled = compiler.compile_json_schema(f.read(), any_whitespace=False)
    torch.set_default_dtype(torch.bfloat16)
    gen = torch.Generator(device=DEV).manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **SHAPE)).eval()
    for b in BATCHES:
        try:
            step, ids, logits = eager_step(model, b, gen)
            modes = ["free", "guided_overlap", "guided_serial", "mixed"]
            run(step, ids, logits, compiled, "guided_overlap", b, gen)
            runs = {m: [] for m in modes}
            for _ in range(REPEATS):
                for m in modes:
                    runs[m].append(run(step, ids, logits, compiled, m, b, gen))
            entry = {
                m: {
                    "step_ms_median": round(statistics.median(r["step_ms"] for r in runs[m]), 3),
                    "mask_fill_ms_median": round(statistics.median(r["fill_ms"] for r in runs[m]), 3),
                    "tokens_rejected": sum(r["rejected"] for r in runs[m]),
                }
                for m in modes
            }
            free = entry["free"]["step_ms_median"]
            for m in modes[1:]:
                entry[f"per_step_ratio_{m}"] = round(entry[m]["step_ms_median"] / free, 3)
            del step
        except Exception:
            entry = {"error": traceback.format_exc()[-2000:]}
        result[f"batch_{b}"] = entry
        print(b, json.dumps(entry), flush=True)
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", HERE), "guided_eager_batches.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
