"""Build TensorRT engines from a converted DMS checkpoint inside the TensorRT-LLM 1.2.1 environment.

    python plugins/trtllm/build_engine.py --checkpoint_dir C --output_dir O --tokenizer_dir T \\
        --max_batch_size 64 --max_input_len 8192 --max_output_len 32768 --tokens_per_block 256 \\
        --kv_pool_tokens 300000 --max_num_tokens 8192 --dtype bfloat16

Run by the build stage (pipeline/stages/build.py) through DMS_TRTLLM_PYTHON or `docker run` of the
TensorRT-LLM container; imports nothing from `pipeline` (only the standard library here, trtllm-build
and this repository's plugins/ in the subprocesses). Writes:

    O/context/, O/generation/   two engines of a DMS model (plugins/trtllm/model.py), or
    O/engine/                   one stock TensorRT-LLM engine for a plain (non-DMS) checkpoint
    O/tokenizer/                the tokenizer files
    O/dms_build.json            the manifest: versions, commands, limits, pool plan, memory plan, timings,
                                and the checkpoint the engines came from (what plugins/trtllm/driver.py reads)

NEVER RUN: written where neither a GPU nor TensorRT-LLM exists (plugins/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from plugins.trtllm.pool import check_fits, plan_memory, plan_pool  # noqa: E402

MODEL_CLASSES = {"QWenForCausalLM": "DmsQWenForCausalLM", "LlamaForCausalLM": "DmsLLaMAForCausalLM"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_dir", required=True, type=Path)
    p.add_argument("--output_dir", required=True, type=Path)
    p.add_argument("--tokenizer_dir", type=Path)
    p.add_argument("--max_batch_size", type=int, required=True)
    p.add_argument("--max_input_len", type=int, required=True)
    p.add_argument("--max_output_len", type=int, required=True)
    p.add_argument("--tokens_per_block", type=int, required=True)
    p.add_argument("--kv_pool_tokens", type=int, required=True, help="slots per (layer, KV head)")
    p.add_argument("--max_num_tokens", type=int, default=None,
                   help="tokens of one context-engine call (the driver chunks longer prefills); "
                   "default max_input_len")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--trtllm_build", default="trtllm-build", help="the trtllm-build executable")
    return p.parse_args(argv)


def build_commands(args: argparse.Namespace, config: dict) -> dict[str, tuple[list[str], dict[str, str]]]:
    """{engine subdir: (trtllm-build argument list, extra environment)} for this checkpoint."""
    tp = int((config.get("mapping") or {}).get("tp_size", 1))
    max_seq = args.max_input_len + args.max_output_len
    common = [
        args.trtllm_build, "--checkpoint_dir", str(args.checkpoint_dir),
        "--max_batch_size", str(args.max_batch_size), "--max_input_len", str(args.max_input_len),
        "--max_seq_len", str(max_seq), "--gemm_plugin", "auto", "--remove_input_padding", "enable",
        "--workers", str(tp),
    ]  # fmt: skip
    # The context engine takes a chunk budget (the driver chunks longer prefills); the generation engine
    # one token per sequence.
    budget = {"context": context_tokens(args), "generation": args.max_batch_size}
    if "dms_window_size" not in config:  # a plain model (pipeline/convert writes no DMS window for it)
        stock = common + ["--max_num_tokens", str(context_tokens(args)),
                          "--output_dir", str(args.output_dir / "engine"), "--gpt_attention_plugin", "auto",
                          "--paged_kv_cache", "enable", "--tokens_per_block", str(args.tokens_per_block)]
        return {"engine": (stock, {})}
    arch = config["architecture"]
    if arch not in MODEL_CLASSES:
        raise SystemExit(f"architecture {arch!r} has no DMS model class; supported: {sorted(MODEL_CLASSES)}")
    plan = plan_pool(config, args.tokens_per_block, args.kv_pool_tokens, args.dtype)
    max_blocks = -(-max_seq // args.tokens_per_block)
    out = {}
    for phase in ("context", "generation"):
        cmd = common + [
            "--max_num_tokens", str(budget[phase]), "--output_dir", str(args.output_dir / phase),
            "--model_cls_file", str(HERE / "model.py"), "--model_cls_name", MODEL_CLASSES[arch],
            "--gpt_attention_plugin", "disable", "--paged_kv_cache", "disable",
        ]  # fmt: skip
        env = {
            "DMS_TRTLLM_PHASE": phase,
            "DMS_TRTLLM_BLOCK_SIZE": str(args.tokens_per_block),
            "DMS_TRTLLM_POOL_BLOCKS": str(plan.total_blocks + 1),  # one pool tensor: every layer + scratch
            "DMS_TRTLLM_MAX_BLOCKS_PER_STREAM": str(max_blocks),
        }
        out[phase] = (cmd, env)
    return out


def context_tokens(args: argparse.Namespace) -> int:
    return args.max_num_tokens or args.max_input_len


def gpu_memory_bytes() -> tuple[str, int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout.splitlines()[0]
    name, mib = (s.strip() for s in out.split(","))
    return name, int(mib) * 2**20


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = json.loads((args.checkpoint_dir / "config.json").read_text())
    import tensorrt
    import tensorrt_llm

    gpu, device_bytes = gpu_memory_bytes()
    manifest: dict = {
        "tensorrt_llm": tensorrt_llm.__version__, "tensorrt": tensorrt.__version__, "gpu": gpu,
        "checkpoint_dir": str(args.checkpoint_dir), "limits": {k: v for k, v in vars(args).items()
                                                               if k.startswith(("max_", "tokens_", "kv_"))},
        "engines": {},
    }  # fmt: skip
    if not tensorrt_llm.__version__.startswith("1.2"):
        print(f"warning: tensorrt_llm {tensorrt_llm.__version__}; this driver targets 1.2.1", file=sys.stderr)
    if "dms_window_size" in config:
        plan = plan_pool(config, args.tokens_per_block, args.kv_pool_tokens, args.dtype)
        tp = int(config["mapping"]["tp_size"])
        weights = sum(f.stat().st_size for f in args.checkpoint_dir.glob("rank*.safetensors")) // tp
        memory = plan_memory(config, plan, weights, args.max_batch_size, context_tokens(args),
                             args.max_input_len + args.max_output_len)
        check_fits(memory, device_bytes)
        manifest["pool"] = plan.to_dict()
        manifest["memory"] = memory.to_dict() | {"device_bytes": device_bytes}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name, (cmd, extra_env) in build_commands(args, config).items():
        print("$ " + " ".join(f"{k}={v}" for k, v in extra_env.items()) + " " + " ".join(cmd), flush=True)
        start = time.monotonic()
        subprocess.run(cmd, env=os.environ | extra_env, check=True)
        manifest["engines"][name] = {"command": cmd, "env": extra_env,
                                     "seconds": round(time.monotonic() - start, 1)}
    if args.tokenizer_dir and args.tokenizer_dir.is_dir():
        shutil.copytree(args.tokenizer_dir, args.output_dir / "tokenizer", dirs_exist_ok=True)
    (args.output_dir / "dms_build.json").write_text(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
