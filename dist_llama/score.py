"""dist-llama-score: a reward model's scores of chat records or preference pairs.

    dist-llama-score --checkpoint runs/reward --input pairs.jsonl
    torchrun --nproc_per_node 4 -m dist_llama.score --checkpoint runs/reward --input chats.jsonl --json

The checkpoint is a reward model (train.objective=reward, or an exported LlamaForSequenceClassification
directory). Records are JSONL, rendered with the tokenizer's chat template as training renders them:
``{"messages": [...]}`` (the reward of the conversation: the score at its last token),
``{"prompt", "chosen", "rejected"}`` (both rewards, and whether chosen scores higher) or Llama 3's
ranked ``{"prompt", "responses": [best, ..., worst]}`` (every response's reward; correct: the share of
ordered pairs the rewards order the same way). Under torchrun the records are split over the ranks
(record i on rank i mod world size, each with the whole model) and rank 0 prints them in order.
Plain output is one tab-separated line per record; --json one object per record; for pairs, a last
line gives the accuracy over every pair.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from dist_llama.config.errors import EXIT_CONFIG, ConfigError
from dist_llama.exit_codes import ArgumentParser

PROG = "dist-llama-score"
BATCH = 16
"""Sequences scored per forward pass."""


def _parser():
    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a reward run, step directory or exported HF directory")
    ap.add_argument("--input", required=True, help="JSONL of chat records or preference pairs")
    ap.add_argument("--tokenizer", default=None, help="tokenizer spec; default: the checkpoint's")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--json", action="store_true", help="one JSON object per record")
    return ap


def read_records(path: str, tokenizer, max_len: int) -> list[tuple[str, list[list[int]]]]:
    """(kind, token ids of each sequence to score) per record: kind 'chat' (one sequence), 'pair'
    (chosen, rejected) or 'ranked' (best first). ConfigError naming the file and line of a bad one."""
    from dist_llama.data.chat import encode_records
    from dist_llama.data.prepare_inputs import InputError

    records = []
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError("--input", f"{path}: {exc.strerror}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError("--input", f"{path}:{lineno}: bad JSON ({exc})") from None
        chat = isinstance(obj, dict) and "messages" in obj
        try:
            ids, _, _ = encode_records([("json", path, lineno, line)], tokenizer, "chat" if chat else "preference")
        except InputError as exc:
            raise ConfigError("--input", str(exc)) from None
        if chat:
            kind, seqs = "chat", ids
        elif "responses" in obj:  # the pairs of a ranked row, (0,1), (0,2), ...: each response once
            n = len(obj["responses"])
            kind, seqs = "ranked", [ids[0]] + [ids[2 * j + 1] for j in range(n - 1)]
        else:
            kind, seqs = "pair", ids
        longest = max(len(s) for s in seqs)
        if longest > max_len:
            raise ConfigError("--input", f"{path}:{lineno}: {longest} tokens, more than the model's max_seq_len "
                                         f"{max_len}")
        records.append((kind, [s.tolist() for s in seqs]))
    if not records:
        raise ConfigError("--input", f"{path} holds no record")
    return records


def summarize(kind: str, rewards: list[float]) -> dict:
    """One record's output: its reward(s) and, for pairs and ranked rows, whether they order it right."""
    if kind == "chat":
        return {"reward": rewards[0]}
    if kind == "pair":
        return {"chosen": rewards[0], "rejected": rewards[1], "correct": rewards[0] > rewards[1]}
    ordered = [(i, j) for i in range(len(rewards)) for j in range(i + 1, len(rewards))]
    right = sum(rewards[i] > rewards[j] for i, j in ordered)
    return {"rewards": rewards, "correct": right / len(ordered), "pairs_correct": right, "pairs": len(ordered)}


def _line(index: int, out: dict) -> str:
    if "reward" in out:
        return f"{index}\treward {out['reward']:.6f}"
    if "chosen" in out:
        return f"{index}\tchosen {out['chosen']:.6f}\trejected {out['rejected']:.6f}\t" + (
            "correct" if out["correct"] else "wrong")
    return f"{index}\trewards {' '.join(f'{r:.6f}' for r in out['rewards'])}\tcorrect {out['pairs_correct']}/{out['pairs']}"


def score_records(model, records: list[tuple[str, list[list[int]]]], pad_id: int) -> list[list[float]]:
    """The rewards of every sequence of every record, BATCH sequences per forward pass."""
    from dist_llama.model.reward import score_sequences

    flat = [s for _, seqs in records for s in seqs]
    scores: list[float] = []
    for start in range(0, len(flat), BATCH):
        scores += score_sequences(model, flat[start : start + BATCH], pad_id).tolist()
    out, at = [], 0
    for _, seqs in records:
        out.append(scores[at : at + len(seqs)])
        at += len(seqs)
    return out


def load_reward_model(checkpoint: str, tokenizer_spec: Optional[str], device, dtype):
    """(model, tokenizer) of a reward checkpoint; ConfigError naming the flag for anything else."""
    from dist_llama.generate import load_checked, open_checkpoint

    source, tokenizer = open_checkpoint(checkpoint, tokenizer_spec, score_head=True)
    model = load_checked(source, device, dtype, tokenizer)
    return model, tokenizer


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch
    import torch.distributed as dist

    try:
        args = _parser().parse_args(argv)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        model, tokenizer = load_reward_model(args.checkpoint, args.tokenizer, device, dtype)
        records = read_records(args.input, tokenizer, model.args.max_seq_len)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    mine = list(range(rank, len(records), world))
    scored = dict(zip(mine, score_records(model, [records[i] for i in mine],
                                          tokenizer.bos_id if tokenizer.bos_id is not None else 0)))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, scored)
        scored = {i: r for part in parts for i, r in part.items()}
        dist.destroy_process_group()
    if rank != 0:
        return 0
    right = total = 0
    for i, (kind, _) in enumerate(records):
        out = summarize(kind, scored[i])
        if kind != "chat":
            right += out.get("pairs_correct", int(out["correct"]))
            total += out.get("pairs", 1)
        print(json.dumps({"index": i, **out}) if args.json else _line(i, out), flush=True)
    if total:
        print(json.dumps({"accuracy": right / total, "pairs": total}) if args.json
              else f"accuracy {right / total:.4f} ({right}/{total} pairs)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
