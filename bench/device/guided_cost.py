"""Device check for issue 25: what guided decoding (xgrammar, the action schema) adds per decode step
when the forward pass runs on a GPU. Not vLLM (the device has none): a HF decode loop with a KV cache,
random weights in the bundled model's shape and in SOLAR/EEVE 10.7B's shape, the bundled tokenizer's
vocabulary. Modes: free; guided with the mask filled while the GPU runs the forward (as vLLM overlaps
it); guided with the mask filled after the forward (no overlap); half guided, half free."""

import json
import os
import statistics
import sys
import time

import torch
import xgrammar as xgr
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, StaticCache

HERE = os.environ.get("GUIDED_INPUTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "inputs")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = len(sys.argv) > 1 and sys.argv[1] == "small"
B = 4 if SMALL else 256
PROMPT = 16 if SMALL else 384
STEPS = 6 if SMALL else 96
REPEATS = 1 if SMALL else 3
VOCAB = 49152

SHAPES = {
    "smollm2_135m_shape": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "solar_eeve_10_7b_shape": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}
if SMALL:
    SHAPES = {"smollm2_135m_shape": SHAPES["smollm2_135m_shape"]}


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def decode(model, compiled, mode: str, gen: torch.Generator) -> dict:
    """Prefill (untimed), then STEPS timed steps of: mask (guided rows), sample, tokens to the host,
    matchers advance, forward one token."""
    ids = torch.randint(0, VOCAB, (B, PROMPT), device=DEV, generator=gen)
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=PROMPT + STEPS + 2)  # no per-step copy
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1].float()
    guided_rows = [] if mode == "free" else list(range(B)) if mode != "mixed" else list(range(0, B, 2))
    matchers = [xgr.GrammarMatcher(compiled) for _ in guided_rows]
    batch = xgr.BatchGrammarMatcher()
    bitmask = xgr.allocate_token_bitmask(B, VOCAB)
    if DEV == "cuda":
        bitmask = bitmask.pin_memory()
    fill_s, resets, rejected = 0.0, 0, 0
    sync()
    started = time.perf_counter()
    for _ in range(STEPS):
        if guided_rows:
            if mode == "guided_serial":
                sync()
            t = time.perf_counter()
            batch.batch_fill_next_token_bitmask(
                matchers, bitmask, indices=guided_rows if mode == "mixed" else None
            )
            fill_s += time.perf_counter() - t
            xgr.apply_token_bitmask_inplace(
                logits, bitmask.to(DEV, non_blocking=True), indices=guided_rows if mode == "mixed" else None
            )
        probs = torch.softmax(logits / 0.8, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        tokens = nxt[:, 0].tolist()
        if guided_rows:
            accepted = batch.batch_accept_token(matchers, [tokens[r] for r in guided_rows])
            rejected += accepted.count(False)
            for m in matchers:
                if m.is_terminated():
                    m.reset()
                    resets += 1
        with torch.no_grad():
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
    sync()
    total = time.perf_counter() - started
    return {
        "step_ms": total / STEPS * 1000,
        "fill_ms": fill_s / STEPS * 1000,
        "resets": resets,
        "rejected": rejected,
    }


def main() -> None:
    result = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": B,
        "prompt_tokens": PROMPT,
        "decode_steps": STEPS,
        "repeats": REPEATS,
        "cpu_count": os.cpu_count(),
        "vocab": VOCAB,
    }
    tok = AutoTokenizer.from_pretrained(os.path.join(HERE, "tok"))
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB)
    with open(os.path.join(HERE, "schema.json")) as f:
        schema = f.read()
    compiler = xgr.GrammarCompiler(info, max_threads=8)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(schema, any_whitespace=False)
    result["compile_ms_first"] = round((time.perf_counter() - t) * 1000, 1)
    t = time.perf_counter()
    compiler.compile_json_schema(schema, any_whitespace=False)
    result["compile_ms_again"] = round((time.perf_counter() - t) * 1000, 3)
    gen = torch.Generator(device=DEV).manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if DEV == "cuda" else torch.float32)
    for name, shape in SHAPES.items():
        cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **shape)
        t = time.perf_counter()
        with torch.device(DEV):
            model = LlamaForCausalLM(cfg).eval()
        sync()
        entry = {
            "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
            "init_s": round(time.perf_counter() - t, 1),
        }
        modes = ["free", "guided_overlap", "guided_serial", "mixed"]
        decode(model, compiled, "guided_overlap", gen)  # warm-up: kernels, allocator, matcher code
        runs = {m: [] for m in modes}
        for _ in range(REPEATS):
            for m in modes:
                runs[m].append(decode(model, compiled, m, gen))
        for m in modes:
            entry[m] = {
                "step_ms_median": round(statistics.median(r["step_ms"] for r in runs[m]), 3),
                "mask_fill_ms_median": round(statistics.median(r["fill_ms"] for r in runs[m]), 3),
                "matcher_resets": sum(r["resets"] for r in runs[m]),
                "tokens_rejected": sum(r["rejected"] for r in runs[m]),
            }
        free = entry["free"]["step_ms_median"]
        entry["per_step_ratio_guided_overlap"] = round(entry["guided_overlap"]["step_ms_median"] / free, 3)
        entry["per_step_ratio_guided_serial"] = round(entry["guided_serial"]["step_ms_median"] / free, 3)
        entry["per_step_ratio_mixed"] = round(entry["mixed"]["step_ms_median"] / free, 3)
        result[name] = entry
        print(name, json.dumps(entry), flush=True)
        del model
        if DEV == "cuda":
            torch.cuda.empty_cache()
    out = os.environ.get("OUT", HERE)
    with open(os.path.join(out, "guided_cost.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
