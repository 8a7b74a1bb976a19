"""Benchmark: what serving a LoRA costs, on one engine started with LoRA slots (MLCHAT_ENABLE_LORA).

The same 64 sample prompts and seeds are generated three ways, each in one `LLM.generate` call:
every prompt on the base model, every prompt with an adapter, and half and half (what a batch mixing
an adapted character with others looks like). The adapter is a rank-8 LoRA on the attention
projections with random weights (its cost does not depend on what it learned). It runs in a process
of its own, so the other sections' engine keeps its settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_MARK = "BENCH_LORA "  # vLLM logs to stdout too: the result line is the one with this mark


def _random_adapter(base: str, out: Path, rank: int = 8) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,  # random A and B: a real adapter's arithmetic, not a no-op
            task_type="CAUSAL_LM",
        ),
    )
    model.save_pretrained(out)


def _measure(prompts: int, max_tokens: int) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from core.settings import settings
    from scripts.bench_generation import sample_requests
    from worker.engine import get_engine
    from worker.model_cache import resolve_model_path

    loaded = get_engine()
    with tempfile.TemporaryDirectory() as folder:
        _random_adapter(resolve_model_path(settings), Path(folder))
        lora = LoRARequest("bench@v1", 1, folder)
        inputs = []
        for r in sample_requests(prompts, "lora", max_tokens):
            messages = [{"role": "user", "content": r["message"]}]
            text = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs.append({"prompt": text})
        params = [
            SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, seed=i) for i in range(prompts)
        ]
        loaded.llm.generate(inputs[:2], params[:2], lora_request=[lora, None], use_tqdm=False)  # warm-up
        seconds = {}
        for name, requests in (
            ("base", [None] * prompts),
            ("adapter", [lora] * prompts),
            ("mixed", [lora if i % 2 else None for i in range(prompts)]),
        ):
            loaded.llm.reset_prefix_cache()
            started = time.perf_counter()
            loaded.llm.generate(inputs, params, lora_request=requests, use_tqdm=False)
            seconds[name] = round(time.perf_counter() - started, 2)
    return {
        "prompts": prompts,
        "tokens_out_each": max_tokens,
        "generate_seconds": seconds,
        "adapter_over_base": round(seconds["adapter"] / seconds["base"], 3),
        "mixed_over_base": round(seconds["mixed"] / seconds["base"], 3),
        "adapter": "rank 8, q/k/v/o projections",
    }


def measure_lora(prompts: int = 64, max_tokens: int = 32) -> dict[str, Any]:
    """Run the measurement in a fresh process with LoRA slots; its figures."""
    env = os.environ | {"MLCHAT_ENABLE_LORA": "true", "MLCHAT_MAX_LORA_RANK": "8"}
    done = subprocess.run(
        [sys.executable, "-m", "scripts.bench_lora", str(prompts), str(max_tokens)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench_lora failed:\n{done.stderr[-3000:]}")
    marked = [line for line in done.stdout.splitlines() if line.startswith(_MARK)]
    if not marked:
        raise RuntimeError(f"bench_lora printed no result:\n{done.stdout[-2000:]}")
    return json.loads(marked[-1][len(_MARK) :])


if __name__ == "__main__":
    print(_MARK + json.dumps(_measure(int(sys.argv[1]), int(sys.argv[2]))), flush=True)
