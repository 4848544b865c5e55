"""dist-llama-sample: K answers to every prompt of a file, on one process or across ranks.

    dist-llama-sample --checkpoint runs/sft --prompts prompts.jsonl --out samples.jsonl --samples 8 \\
        --temperature 1.2 --top-p 0.9 --max-new-tokens 256
    torchrun --nproc_per_node 8 -m dist_llama.sample --checkpoint runs/sft --prompts p.jsonl --out s.jsonl

Prompts are JSONL: ``{"messages": [...]}`` rendered with the tokenizer's chat template up to the
assistant's turn (a final assistant message, as in chat training data, is left out), or
``{"text": ...}`` encoded as it is. The output has one line per prompt, in prompt order:
``{"index", "prompt", "prompt_ids", "samples": [{"text", "ids", "finish"}, ...]}`` ("finish":
"end_of_turn" or "length"; "ids" end with the stop token when one was reached, "text" is without it).

The prompts are cut into blocks of --batch-prompts, each generated as one batch (the K samples of
a prompt share its prefill: model/batch_generation.py); block b runs on rank b mod world size, and
sample j of prompt i draws from a generator seeded by (--seed, i, j). So the file is the same for
any number of ranks (for a given --tp). Each finished block is written atomically to OUT.parts/; a restarted job skips
the blocks already there, and rank 0 joins them into OUT at the end: byte-identical to an
uninterrupted run. Every rank holds the whole model (replicated), or with --tp N each group of N
ranks holds one copy sharded Megatron-style (parallel/tensor.py apply_tp_inference), each rank
reading only its slices of the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from dist_llama.config.errors import EXIT_CONFIG, ConfigError
from dist_llama.exit_codes import ArgumentParser

PROG = "dist-llama-sample"


@dataclass
class Prompt:
    index: int
    prompt: object
    """The record's messages (without a final assistant turn) or text, as the output repeats it."""
    ids: list[int]


def add_sampling_flags(ap) -> None:
    ap.add_argument("--prompts", required=True, help="JSONL: {messages: [...]} or {text: ...} per line")
    ap.add_argument("--samples", type=int, default=1, help="answers per prompt (K)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per answer at most")
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold, in (0, 1]")
    ap.add_argument("--seed", type=int, default=0, help="sample j of prompt i draws with a generator seeded by (seed, i, j)")
    ap.add_argument("--batch-prompts", type=int, default=8, help="prompts generated together (a block)")
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor-parallel degree: groups of this many ranks share one copy of the model (for a model "
                         "one device cannot hold); the world size must be a multiple")
    ap.add_argument("--tokenizer", default=None, help="tokenizer spec; default: the checkpoint's")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="default: bfloat16 on CUDA, float32 on CPU")


def check_sampling_flags(args) -> None:
    from dist_llama.generate import MIN_TEMPERATURE

    if args.samples < 1:
        raise ConfigError("--samples", f"must be >= 1, got {args.samples}")
    if args.tp < 1 or int(os.environ.get("WORLD_SIZE", "1")) % args.tp:
        raise ConfigError("--tp", f"must be >= 1 and divide the number of ranks ({os.environ.get('WORLD_SIZE', '1')}), "
                                  f"got {args.tp}")
    if args.batch_prompts < 1:
        raise ConfigError("--batch-prompts", f"must be >= 1, got {args.batch_prompts}")
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", f"must be >= 1, got {args.max_new_tokens}")
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < float("inf")):
        raise ConfigError("--temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, inf), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError("--top-k", f"must be >= 1, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ConfigError("--top-p", f"must be in (0, 1], got {args.top_p}")
    if not 0 <= args.seed < 2**63:
        raise ConfigError("--seed", f"must be in [0, 2**63), got {args.seed}")
    if not os.path.isfile(args.prompts):
        raise ConfigError("--prompts", f"no such file: {args.prompts}")


def read_prompts(path: str, tokenizer, chat_only: bool = False) -> list[Prompt]:
    """Every prompt of the file, rendered; ConfigError naming the file and line of a bad one."""
    from dist_llama.data.chat import ROLES, template_for
    from dist_llama.data.record_checks import check_turns

    template = template_for(tokenizer)
    prompts = []
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError("--prompts", f"{where}: bad JSON ({exc})") from None
        if isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
            messages = obj["messages"]
            if not all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                       for m in messages):
                raise ConfigError("--prompts", f"{where}: messages must be {{role, content}} objects")
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            try:
                check_turns(messages)
            except ValueError as exc:
                raise ConfigError("--prompts", f"{where}: {exc}") from None
            if not messages or messages[-1]["role"] != "user":
                raise ConfigError("--prompts", f"{where}: the prompt must end with a user message")
            prompts.append(Prompt(len(prompts), messages, template.render(messages, generation_prompt=True)[0]))
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"] and not chat_only:
            prompts.append(Prompt(len(prompts), obj["text"], tokenizer.encode(obj["text"], bos=tokenizer.bos_id is not None)))
        else:
            wanted = '{"messages": [...]}' if chat_only else '{"messages": [...]} or {"text": "..."}'
            raise ConfigError("--prompts", f"{where}: expected {wanted}")
    if not prompts:
        raise ConfigError("--prompts", f"{path} holds no prompt")
    return prompts


def row_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of sample j of prompt i: a function of (seed, i, j) alone."""
    from dist_llama.data.permutation import mix_key

    return mix_key(seed, prompt, sample) & (2**63 - 1)


def stop_ids(tokenizer) -> list[int]:
    """End of turn first (chat answers end there), then the tokenizer's other stops."""
    from dist_llama.data.chat import template_for
    from dist_llama.generate import _stop_ids

    eot = template_for(tokenizer).end_of_turn
    return [eot] + [s for s in _stop_ids(tokenizer) if s != eot]


def sample_block(model, tokenizer, block: list[Prompt], args, stops: list[int]) -> list[dict]:
    """The output records of one block of prompts."""
    from dist_llama.model.batch_generation import generate_batch

    K = args.samples
    out = generate_batch(model, [p.ids for p in block], args.max_new_tokens, samples=K,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seeds=[row_seed(args.seed, p.index, j) for p in block for j in range(K)], stop_ids=stops)
    records = []
    for n, p in enumerate(block):
        samples = []
        for c in out[n * K : (n + 1) * K]:
            text_ids = c.ids[:-1] if c.finish == "end_of_turn" else c.ids
            samples.append({"text": tokenizer.decode(text_ids), "ids": c.ids, "finish": c.finish})
        records.append({"index": p.index, "prompt": p.prompt, "prompt_ids": p.ids, "samples": samples})
    return records


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def job_identity(args, checkpoint: dict, prompts_path: str) -> dict:
    """What decides the output: a restart with anything else must not reuse the finished blocks."""
    with open(prompts_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    keys = ("samples", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "batch_prompts", "tokenizer", "tp")
    return {"prompts_sha256": digest, **checkpoint, **{k: getattr(args, k) for k in keys}}


def run_blocks(prompts: list[Prompt], out: Path, identity: dict, batch: int, make_block: Callable[[list[Prompt]], list[dict]],
               ranks: "Ranks") -> dict:
    """Every block of this rank's group not yet in OUT.parts, written (by the group's first rank) as
    it finishes; then (rank 0) OUT. Returns this rank's counts {prompts, samples, tokens, seconds}."""
    rank, world = ranks.rank, ranks.world
    import torch.distributed as dist
    from tqdm import tqdm

    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    job = parts / "job.json"
    # every rank checks (the same file, written before this job or atomically by rank 0 below)
    if job.exists() and json.loads(job.read_text()) != identity:
        raise ConfigError("--out", f"{parts} holds the blocks of another job (other checkpoint, prompts or "
                                   "settings); remove it or choose another --out")
    if world > 1:
        dist.barrier()
    if rank == 0 and not job.exists():
        _write_atomic(job, json.dumps(identity, indent=1) + "\n")
    blocks = [prompts[s : s + batch] for s in range(0, len(prompts), batch)]
    mine = [b for b in range(ranks.group, len(blocks), ranks.groups) if not (parts / f"block-{b:06d}.jsonl").exists()]
    counts = {"prompts": 0, "samples": 0, "tokens": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    bar = tqdm(mine, desc=f"{PROG} rank {rank}", unit="block", disable=rank != 0, file=sys.stderr)
    for b in bar:
        records = make_block(blocks[b])
        if ranks.writes:
            _write_atomic(parts / f"block-{b:06d}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        counts["prompts"] += len(records)
        counts["samples"] += sum(len(r["samples"]) for r in records)
        counts["tokens"] += sum(len(s["ids"]) for r in records for s in r["samples"])
        counts["seconds"] = time.perf_counter() - t0
        bar.set_postfix(tokens_per_s=f"{counts['tokens'] / max(counts['seconds'], 1e-9):.1f}", refresh=False)
    bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        text = "".join((parts / f"block-{b:06d}.jsonl").read_text() for b in range(len(blocks)))
        _write_atomic(out, text)
        shutil.rmtree(parts)
    return counts


def report(counts: dict, rank: int) -> None:
    rate = counts["tokens"] / max(counts["seconds"], 1e-9)
    sys.stderr.write(f"{PROG}: rank {rank}: {counts['prompts']} prompts, {counts['samples']} samples, "
                     f"{counts['tokens']} tokens, {rate:.1f} tokens/s\n")  # one write: ranks' lines stay whole


def load_policy(checkpoint: str, tokenizer_spec: Optional[str], device, dtype, load: bool = True):
    """(model, tokenizer, source) of a language model checkpoint (model None unless `load`: the
    caller shards it); ConfigError naming the flag."""
    from dist_llama.generate import load_checked, open_checkpoint

    source, tokenizer = open_checkpoint(checkpoint, tokenizer_spec, score_head=False)
    model = load_checked(source, device, dtype, tokenizer) if load else None
    return model, tokenizer, source


def device_and_dtype(args):
    import torch

    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", f"{args.device}: no CUDA device is available here")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))


def check_lengths(prompts: list[Prompt], max_new_tokens: int, max_seq_len: int) -> None:
    longest = max(prompts, key=lambda p: len(p.ids))
    if len(longest.ids) + max_new_tokens > max_seq_len:
        raise ConfigError("--max-new-tokens", f"prompt {longest.index} ({len(longest.ids)} tokens) + "
                                              f"{max_new_tokens} new tokens exceeds the model's max_seq_len {max_seq_len}")


@dataclass
class Ranks:
    """This process among the job's: rank and world size; its group (the ranks sharing one copy of
    the model: --tp of them), the number of groups; whether it writes its group's blocks."""

    rank: int = 0
    world: int = 1
    group: int = 0
    groups: int = 1
    writes: bool = True
    tp_mesh: object = None


def init_ranks(tp: int = 1, device_type: str = "cpu") -> Ranks:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    tp_mesh = None
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        tp_mesh = init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))["tp"]
    return Ranks(rank, world, rank // tp, world // tp, rank % tp == 0, tp_mesh)


def load_tensor_parallel(source, tp_mesh, device, dtype):
    """The model sharded over `tp_mesh` for generation, each rank reading only its slices."""
    import dataclasses

    import torch

    from dist_llama.model import Transformer
    from dist_llama.parallel.tensor import apply_tp_inference
    from dist_llama.weights.load import load_into

    args = dataclasses.replace(source.args, attn_impl="sdpa")
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    apply_tp_inference(model, tp_mesh)
    model.to_empty(device=device)
    model.init_buffers(device)
    load_into(model, source)
    return model.eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="anything dist-llama-generate reads")
    ap.add_argument("--out", required=True, help="the output JSONL (OUT.parts/ holds finished blocks meanwhile)")
    add_sampling_flags(ap)
    args = ap.parse_args(argv)
    try:
        check_sampling_flags(args)
        device, dtype = device_and_dtype(args)
        model, tokenizer, source = load_policy(args.checkpoint, args.tokenizer, device, dtype, load=args.tp == 1)
        prompts = read_prompts(args.prompts, tokenizer)
        check_lengths(prompts, args.max_new_tokens, source.args.max_seq_len)
        identity = job_identity(args, {"checkpoint": str(source.path)}, args.prompts)
        ranks = init_ranks(args.tp, device.type)
        if args.tp > 1:
            model = load_tensor_parallel(source, ranks.tp_mesh, device, dtype)
        stops = stop_ids(tokenizer)
        counts = run_blocks(prompts, Path(args.out), identity, args.batch_prompts,
                            lambda block: sample_block(model, tokenizer, block, args, stops), ranks)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    report(counts, ranks.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
