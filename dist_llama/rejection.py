"""dist-llama-rejection-sample: K answers per prompt from the policy, scored by the reward model(s) on
the same ranks; every sample with its scores, and the best answer per prompt as SFT chat data
(Llama 2 §3.2.3, Llama 3 §4.2).

    dist-llama-rejection-sample --policy runs/sft --reward runs/reward --prompts p.jsonl --samples 8 \\
        --out samples.jsonl --sft-out best.jsonl [--reward-safety runs/safety] [--keep-best-of round1.jsonl]
    dist-llama-prepare --format chat --out data/round2 best.jsonl     # then SFT on it

Prompts are chat records (``{"messages": [...]}``; ``"unsafe": true`` marks a safety prompt). OUT
is dist-llama-sample's format with ``"score"`` in every sample (and ``"safety_score"`` with a safety
model). The best answer of a prompt is the sample with the highest combined score: the helpfulness
score, or, with --reward-safety, Llama 2's rule: the safety score when the prompt is marked unsafe
or the sample's safety score is below --safety-threshold (0.15), else the helpfulness score.
--keep-best-of an earlier round's OUT (repeatable) lets its samples compete too, as Llama 2 kept
the top samples of all iterations. Every reward model must use the policy's tokenizer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from dist_llama.config.errors import EXIT_CONFIG, ConfigError
from dist_llama.exit_codes import ArgumentParser
from dist_llama.sample import (add_sampling_flags, check_lengths, check_sampling_flags, device_and_dtype, init_ranks,
                               job_identity, load_policy, read_prompts, report, run_blocks, sample_block, stop_ids)

PROG = "dist-llama-rejection-sample"
SAFETY_THRESHOLD = 0.15
"""Llama 2: below this safety score, the safety model's score decides."""


def combined(sample: dict, unsafe: bool, threshold: float) -> float:
    """The score a sample competes with: Llama 2's R_c."""
    safety = sample.get("safety_score")
    if safety is not None and (unsafe or safety < threshold):
        return safety
    return sample["score"]


def _load_reward(path: str, tokenizer, flag: str, device, dtype):
    from dist_llama.score import load_reward_model
    from dist_llama.weights import open_weights
    from dist_llama.weights.tokenizer_identity import tokenizer_mismatch

    try:
        model, _ = load_reward_model(path, None, device, dtype)
    except ConfigError as exc:
        raise ConfigError(flag, str(exc).split(": ", 1)[-1]) from None
    theirs = tokenizer_mismatch(open_weights(path), tokenizer)
    if theirs is not None:
        raise ConfigError(flag, f"{path} was trained with another tokenizer ({theirs}) than the policy's "
                                f"({tokenizer.name}): its scores of the policy's tokens would mean nothing")
    return model


def score_block(records: list[dict], rewards: dict, template, pad_id: int) -> list[dict]:
    """Each sample's score under every reward model (key → model), in place."""
    from dist_llama.score import score_records

    seqs = []
    for r in records:
        for s in r["samples"]:  # the conversation as training renders it: prompt, then the answer
            ids, _ = template.render(r["prompt"] + [{"role": "assistant", "content": s["text"]}])
            seqs.append(("chat", [ids]))
    for key, model in rewards.items():
        flat = iter(score_records(model, seqs, pad_id))
        for r in records:
            for s in r["samples"]:
                s[key] = next(flat)[0]
    return records


def best_answers(out: Path, previous: list[str], unsafe: dict[int, bool], threshold: float) -> list[dict]:
    """Per prompt (in order), the chat record of its best sample over OUT and every earlier round."""
    rounds = [out, *map(Path, previous)]
    best: dict[int, tuple[float, list, str]] = {}
    for path in rounds:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            for s in r["samples"]:
                score = combined(s, unsafe.get(r["index"], False), threshold)
                if r["index"] not in best or score > best[r["index"]][0]:
                    best[r["index"]] = (score, r["prompt"], s["text"])
    return [{"messages": prompt + [{"role": "assistant", "content": text}], "score": score}
            for _, (score, prompt, text) in sorted(best.items())]


def _unsafe_marks(path: str) -> dict[int, bool]:
    marks, index = {}, 0
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            marks[index] = bool(json.loads(line).get("unsafe", False))
            index += 1
    return marks


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="the language model to sample from (a run or HF/Meta directory)")
    ap.add_argument("--reward", required=True, help="the (helpfulness) reward model")
    ap.add_argument("--reward-safety", default=None, help="a safety reward model (Llama 2's rule)")
    ap.add_argument("--safety-threshold", type=float, default=SAFETY_THRESHOLD,
                    help="below this safety score the safety model decides (Llama 2: 0.15)")
    ap.add_argument("--keep-best-of", action="append", default=[],
                    help="an earlier round's OUT whose samples compete too (repeatable)")
    ap.add_argument("--out", required=True, help="every sample with its scores (JSONL, one line per prompt)")
    ap.add_argument("--sft-out", required=True, help="the best answer per prompt, chat JSONL for dist-llama-prepare")
    add_sampling_flags(ap)
    args = ap.parse_args(argv)
    try:
        check_sampling_flags(args)
        for path in args.keep_best_of:
            if not Path(path).is_file():
                raise ConfigError("--keep-best-of", f"no such file: {path}")
        device, dtype = device_and_dtype(args)
        policy, tokenizer, source = load_policy(args.policy, args.tokenizer, device, dtype)
        rewards = {"score": _load_reward(args.reward, tokenizer, "--reward", device, dtype)}
        if args.reward_safety:
            rewards["safety_score"] = _load_reward(args.reward_safety, tokenizer, "--reward-safety", device, dtype)
        prompts = read_prompts(args.prompts, tokenizer, chat_only=True)
        check_lengths(prompts, args.max_new_tokens, policy.args.max_seq_len)
        longest = max(len(p.ids) for p in prompts) + args.max_new_tokens + 1
        for key, model in rewards.items():
            if longest > model.args.max_seq_len:
                raise ConfigError("--max-new-tokens", f"prompt + answer ({longest} tokens) exceeds the reward "
                                                      f"model's max_seq_len {model.args.max_seq_len}")
        identity = job_identity(args, {"policy": str(source.path), "reward": args.reward,
                                       "reward_safety": args.reward_safety}, args.prompts)
        if args.tp > 1:
            raise ConfigError("--tp", "rejection sampling holds the policy and reward models whole on every rank "
                                      "(--tp 1)")
        ranks = init_ranks()
        from dist_llama.data.chat import template_for

        template, stops = template_for(tokenizer), stop_ids(tokenizer)
        pad = tokenizer.bos_id if tokenizer.bos_id is not None else 0
        counts = run_blocks(prompts, Path(args.out), identity, args.batch_prompts,
                            lambda block: score_block(sample_block(policy, tokenizer, block, args, stops), rewards,
                                                      template, pad), ranks)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    report(counts, ranks.rank)
    if ranks.rank == 0:
        best = best_answers(Path(args.out), args.keep_best_of, _unsafe_marks(args.prompts), args.safety_threshold)
        Path(args.sft_out).write_text("".join(json.dumps(b) + "\n" for b in best))
        print(f"{PROG}: {len(best)} best answers in {args.sft_out}; mean best score "
              f"{sum(b['score'] for b in best) / len(best):.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
