"""dist-llama-generate: continue prompts with a trained or converted model (KV cache; greedy at
temperature 0, else temperature / top-k / top-p sampling; stops at the tokenizer's EOS).

    dist-llama-generate --checkpoint PATH --prompt "In the beginning" --max-new-tokens 64
    dist-llama-generate --checkpoint PATH --prompt-file prompts.txt --temperature 0.8 --top-p 0.9 --json

--prompt may be repeated; a prompt file holds one prompt per line (blank lines skipped). --json
prints one object per prompt: {"prompt_ids": [...], "ids": [...generated...], "text": "..."}; "ids"
ends with the stop token when one was reached, "text" is the decoded continuation without it.
--chat renders each prompt as a user turn with the tokenizer's chat template (data/chat.py) and
prints the assistant's answer, stopping at the end of its turn.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Optional, Sequence

from dist_llama.config.errors import EXIT_CONFIG, ConfigError

PROG = "dist-llama-generate"
# Llama 3 chat models end a turn with <|eot_id|> rather than the tokenizer's EOS: stop at either.
_EOT = "<|eot_id|>"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line naming the flag, like every other bad input, instead of argparse's usage block.
        flag = re.match(r"argument (\S+): (.*)", message)
        raise ConfigError(flag[1], flag[2]) if flag else ConfigError("arguments", message)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True,
                    help="weights to load: anything dist_llama.weights.open_weights reads")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompt-file", help="a text file, one prompt per line")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt at most")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold, in (0, 1]")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer spec (byte, tokenizer.json, tokenizer.model); default: the checkpoint's")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="weights and activations; default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    ap.add_argument("--json", action="store_true", help="one JSON object per prompt")
    ap.add_argument("--chat", action="store_true",
                    help="each prompt is a user turn rendered with the tokenizer's chat template (Llama 3 headers, "
                         "else Llama 2 [INST]); the answer stops at the end of the assistant turn")
    return ap


MIN_TEMPERATURE = 1e-4
"""Below this, sampling is greedy in all but name, and a small enough value overflows the logits."""


def _check(args) -> None:
    """Bad flags exit 2 before anything is loaded."""
    if bool(args.prompt) == bool(args.prompt_file):
        raise ConfigError("--prompt/--prompt-file", "give prompts with exactly one of them")
    if args.prompt_file and not os.path.isfile(args.prompt_file):
        raise ConfigError("--prompt-file", f"no such file: {args.prompt_file}")
    if not os.path.exists(args.checkpoint):
        raise ConfigError("--checkpoint", f"no such file or directory: {args.checkpoint}")
    if args.max_new_tokens < 0:
        raise ConfigError("--max-new-tokens", f"must be >= 0, got {args.max_new_tokens}")
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < float("inf")):
        raise ConfigError("--temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, inf) (logits divided by "
                                           f"less overflow), got {args.temperature}")
    if not 0 <= args.seed < 2**63:
        raise ConfigError("--seed", f"must be in [0, 2**63), got {args.seed}")
    if args.device is not None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
            raise ConfigError("--device", f"must be cpu, cuda or cuda:N, got {args.device!r}")
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device", f"{args.device}: no CUDA device is available here")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError("--top-k", f"must be >= 1, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ConfigError("--top-p", f"must be in (0, 1], got {args.top_p}")


def _prompts(args) -> list[str]:
    if args.prompt:
        return args.prompt
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\r\n") for line in f if line.strip()]
    except UnicodeDecodeError as exc:
        raise ConfigError("--prompt-file", f"{args.prompt_file} is not UTF-8 text (byte {exc.start})") from None
    if not prompts:
        raise ConfigError("--prompt-file", f"{args.prompt_file} holds no prompt")
    return prompts


def load_model(source, device, dtype, vocab: Optional[int] = None):
    """A Transformer holding `source`'s weights (a dist_llama.weights.WeightSource), built on the meta
    device so that no random initialisation is spent on it. `vocab`: keep only the embedding and
    output rows of the first `vocab` ids (the tokenizer's), so no id it cannot decode is generated.
    WeightsError (naming file and tensor) for a weight that is not finite."""
    import dataclasses

    import torch

    from dist_llama.model import Transformer

    # SDPA: FlexAttention's strength is document masks in training; here it would recompile per length.
    args = dataclasses.replace(source.args, attn_impl="sdpa", vocab_size=vocab or source.args.vocab_size)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model.to_empty(device=device)
    model.init_buffers(device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            rows = (slice(0, args.vocab_size),) if name in ("tok_embeddings.weight", "output.weight") else ()
            param.copy_(source.read(name, rows))
    return model.eval()


def open_checkpoint(checkpoint: str, tokenizer_spec: Optional[str], score_head: Optional[bool] = None):
    """(weight source, tokenizer) of a checkpoint for the post-training commands: ConfigError naming
    the flag when it does not exist, is not weights, is not the kind asked for (score_head True: a
    reward model; False: a language model; None: either), or its tokenizer cannot be had or is larger
    than the model's vocabulary."""
    from dist_llama.data import build_tokenizer
    from dist_llama.weights import open_weights

    if not os.path.exists(checkpoint):
        raise ConfigError("--checkpoint", f"no such file or directory: {checkpoint}")
    try:
        source = open_weights(checkpoint)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError("--checkpoint", str(exc)) from None
    if score_head is False and source.args.score_head:
        raise ConfigError("--checkpoint", f"{checkpoint} is a reward model (a score head): it cannot generate")
    if score_head and not source.args.score_head:
        raise ConfigError("--checkpoint", f"{checkpoint} is a language model, not a reward model (train it with "
                                          "train.objective=reward)")
    spec = tokenizer_spec or source.tokenizer
    if spec is None:
        raise ConfigError("--tokenizer", f"{checkpoint} names no tokenizer; pass one")
    try:
        tokenizer = build_tokenizer(spec)
    except (ValueError, OSError) as exc:
        raise ConfigError("--tokenizer", str(exc)) from None
    if tokenizer.vocab_size > source.args.vocab_size:
        raise ConfigError("--tokenizer", f"{tokenizer.name} has {tokenizer.vocab_size} ids, the model "
                                         f"only {source.args.vocab_size}")
    return source, tokenizer


def load_checked(source, device, dtype, tokenizer):
    """load_model with the tokenizer's vocabulary; a weight that is not finite is a ConfigError naming it."""
    try:
        return load_model(source, device, dtype, vocab=tokenizer.vocab_size)
    except ValueError as exc:
        raise ConfigError("--checkpoint", str(exc)) from None


def _stop_ids(tokenizer) -> list[int]:
    from dist_llama.data import HFTokenizer, TiktokenTokenizer

    eot = None
    if isinstance(tokenizer, TiktokenTokenizer):
        eot = tokenizer.special_tokens.get(_EOT)
    elif isinstance(tokenizer, HFTokenizer):
        eot = tokenizer.model.token_to_id(_EOT)
    return [tokenizer.eos_id] + ([eot] if eot is not None and eot != tokenizer.eos_id else [])


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = _parser().parse_args(argv)
        _check(args)
        prompts = _prompts(args)
        source, tokenizer = open_checkpoint(args.checkpoint, args.tokenizer)
        bos = tokenizer.bos_id is not None
        if args.chat:
            from dist_llama.data.chat import template_for

            template = template_for(tokenizer)
            prompt_ids = [template.render([{"role": "user", "content": p}], generation_prompt=True)[0] for p in prompts]
        else:
            prompt_ids = [tokenizer.encode(p, bos=bos) for p in prompts]
        longest = max(len(p) for p in prompt_ids) + args.max_new_tokens
        if longest > source.args.max_seq_len:
            raise ConfigError("--max-new-tokens", f"prompt + new tokens = {longest} exceeds the model's "
                                                  f"max_seq_len {source.args.max_seq_len}")
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    import torch

    from dist_llama.model.generation import generate

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    try:
        model = load_model(source, device, dtype, vocab=tokenizer.vocab_size)
    except ValueError as exc:  # WeightsError: a NaN or infinity in a weight, named
        print(f"{PROG}: --checkpoint: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if tokenizer.vocab_size < source.args.vocab_size:  # a padded vocabulary, or another tokenizer
        print(f"{PROG}: the model has {source.args.vocab_size} ids, tokenizer {tokenizer.name} "
              f"{tokenizer.vocab_size}: ids {tokenizer.vocab_size}..{source.args.vocab_size - 1} are never "
              "generated", file=sys.stderr)
    stops = _stop_ids(tokenizer)
    if args.chat:
        stops = [template.end_of_turn] + [s for s in stops if s != template.end_of_turn]
    outputs = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       args.seed, stop_ids=stops, use_cache=not args.no_cache)
    for i, (text_in, prompt, ids) in enumerate(zip(prompts, prompt_ids, outputs)):
        text = tokenizer.decode(ids[:-1] if ids and ids[-1] in stops else ids)
        if args.json:
            print(json.dumps({"prompt_ids": prompt, "ids": ids, "text": text}), flush=True)
        elif args.chat:  # the answer alone: the template around the prompt is not the user's text
            print(text.strip(), flush=True)
        else:  # the prompt, then its continuation (which may well start with a space)
            print(("\n" if i else "") + text_in + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
