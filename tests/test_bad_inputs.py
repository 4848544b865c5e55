"""Every command's bad input, table-driven: exit code 2, exactly one line on stderr naming the
offending key, flag or file, and no traceback. Each row runs the command's main() in-process (no
process group is ever started: every row is refused before one) on files the row writes first.

Weight sources (malformed Hugging Face / Meta configs, safetensors headers, shards) have their own
table in test_weights.py."""

from __future__ import annotations

import json

import pytest

RECORD = {"prompt": [{"role": "user", "content": "Is water wet?"}], "chosen": "Yes.", "rejected": "No."}
CHAT_OK = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def sources(weight_a, weight_b) -> str:
    return (f"data:\n  sources:\n  - {{name: a, path: kjv, weight: {weight_a}}}\n"
            f"  - {{name: b, path: kjv, weight: {weight_b}}}\n")


META = {"format": "dist_llama.tokens", "version": 1, "tokenizer": "byte", "vocab_size": 258, "dtype": "uint16",
        "n_tokens": 10, "n_docs": 1, "shards": [], "bos": True}  # a dataset's meta.json, hand-edited below
DEBUG = "configs/debug.yaml"
T = ("train", ["--config", DEBUG, "train.run_dir={tmp}/run"])  # prefix: the debug preset in a fresh run dir
P = ["--tokenizer", "byte", "--out", "{tmp}/out"]  # prepare's required flags
PLAN = ["--config", DEBUG, "model.vocab_size=256"]  # the planner needs an explicit vocabulary

# (id, command, args, files written first {name: text or bytes}, text the one line must contain)
ROWS = [
    # --config files that are not a preset
    ("config-empty", "train", ["--config", "{tmp}/empty.yaml"], {"empty.yaml": ""}, "empty.yaml is empty"),
    ("config-comments-only", "train", ["--config", "{tmp}/c.yaml"], {"c.yaml": "# nothing\n"}, "c.yaml is empty"),
    ("config-binary", "train", ["--config", "{tmp}/b.yaml"], {"b.yaml": bytes(range(256)) * 4}, "b.yaml is not UTF-8"),
    ("config-latin1", "train", ["--config", "{tmp}/l.yaml"], {"l.yaml": "model:\n  dim: 64 # caf\xe9\n".encode("latin-1")},
     "l.yaml is not UTF-8"),
    ("config-list", "train", ["--config", "{tmp}/l.yaml"], {"l.yaml": "- a\n- b\n"}, "l.yaml must hold a mapping"),
    ("config-scalar", "train", ["--config", "{tmp}/s.yaml"], {"s.yaml": "42\n"}, "s.yaml must hold a mapping"),
    ("config-duplicate-section", "train", ["--config", "{tmp}/d.yaml"],
     {"d.yaml": "model:\n  dim: 64\ntrain:\n  steps: 1\ntrain:\n  steps: 2\n"}, "duplicate key 'train' (line 5)"),
    ("config-duplicate-key", "train", ["--config", "{tmp}/d.yaml"], {"d.yaml": "train:\n  steps: 1\n  steps: 2\n"},
     "duplicate key 'steps'"),
    ("config-bad-yaml", "train", ["--config", "{tmp}/y.yaml"], {"y.yaml": "train: [1,\n"}, "y.yaml is not valid YAML"),
    ("config-directory", "train", ["--config", "{tmp}"], {}, "--config: file not found"),
    ("config-missing", "train", ["--config", "{tmp}/nope.yaml"], {}, "nope.yaml"),
    ("config-flag-without-value", "train", ["--config"], {}, "--config"),
    ("section-scalar", "train", ["--config", "{tmp}/s.yaml"], {"s.yaml": "train: 5\n"}, "train: must be a mapping"),
    ("list-for-scalar", "train", ["--config", "{tmp}/s.yaml"], {"s.yaml": "train:\n  steps: [1, 2]\n"}, "train.steps"),
    ("nested-garbage", "train", ["--config", "{tmp}/s.yaml"], {"s.yaml": "optim:\n  lr: {a: {b: [1]}}\n"}, "optim.lr"),
    # keys inside list items, named with their path
    ("source-weight-type", "train", ["--config", "{tmp}/s.yaml"], {"s.yaml": sources(1, "abc")},
     "data.sources[1].weight: wrong type"),
    ("source-unknown-key", "train", ["--config", "{tmp}/s.yaml"],
     {"s.yaml": "data:\n  sources:\n  - {name: a, path: kjv}\n  - {name: b, path: kjv, wieght: 2}\n"},
     "data.sources[1].wieght: unknown key"),
    ("stage-weight-type", "train", ["--config", "{tmp}/s.yaml"],
     {"s.yaml": sources(1, 1) + "  stages:\n  - {seq_len: 64}\n  - {weights: {a: abc}}\n"},
     "data.stages[1].weights.a: wrong type"),
    # numbers: non-finite anywhere (lists and maps too), absurd where clearly wrong
    ("source-weight-inf", "train", ["--config", "{tmp}/s.yaml"], {"s.yaml": sources(".inf", 1)},
     "data.sources[0].weight: must be a finite number"),
    ("stage-weight-nan", "train", ["--config", "{tmp}/s.yaml"],
     {"s.yaml": sources(1, 1) + "  stages:\n  - {weights: {a: .nan, b: 1}}\n"}, "data.stages[0].weights.a"),
    ("anneal-weight-inf", "train", ["--config", "{tmp}/s.yaml"],
     {"s.yaml": sources(1, 1) + "  anneal_tokens: 1000\n  anneal_weights: {a: 1, b: .inf}\n"},
     "data.anneal_weights.b"),
    ("source-weights-zero", "train", ["--config", "{tmp}/s.yaml"], {"s.yaml": sources(0, 0)}, "data.sources"),
    ("lr-1e308", *T, {}, "optim.lr: must be in (0, 10]"),
    ("lr-nan", *T, {}, "optim.lr: must be a finite number"),
    ("eps-1e308", *T, {}, "optim.eps"),
    ("weight-decay-1e308", *T, {}, "optim.weight_decay"),
    ("seed-negative", *T, {}, "train.seed"),
    ("eval-fraction-nan", *T, {}, "data.eval_fraction"),
    ("seq-len-negative", *T, {}, "data.seq_len"),
    # paths that are not what the key needs
    ("data-path-directory", *T, {}, "data.path"),
    ("tokenizer-empty-file", *T, {"tok.model": ""}, "data.tokenizer"),
    ("dataset-meta-wrong-types", *T, {"ds/meta.json": json.dumps({**META, "n_tokens": "10", "shards": 5})},
     "meta.json: n_tokens must be a non-negative integer"),
    ("dataset-shard-outside", *T, {"ds/meta.json": json.dumps({**META, "shards": [{"file": "../x.bin", "n_tokens": 10}]}),
                                   "x.bin": b"\0" * 20}, "'../x.bin' is not a file name in the dataset directory"),
    ("run-dir-is-a-file", "train", ["--config", DEBUG, "train.run_dir={tmp}/f"], {"f": "x"}, "train.run_dir"),
    ("init-from-not-weights", *T, {}, "checkpoint.init_from"),
    # overrides
    ("override-without-value", *T, {}, "train.steps: overrides are key=value"),
    ("override-unresolved", *T, {}, "train.steps: cannot be resolved"),
    # dist-llama-prepare
    ("prepare-messages-int", "prepare", [*P, "--format", "chat", "{tmp}/m.jsonl"], {"m.jsonl": '{"messages": 5}\n'},
     "m.jsonl:1: 'messages' must be a list"),
    ("prepare-messages-ints", "prepare", [*P, "--format", "chat", "{tmp}/m.jsonl"], {"m.jsonl": '{"messages": [5]}\n'},
     "m.jsonl:1:"),
    ("prepare-prompt-int", "prepare", [*P, "--format", "preference", "{tmp}/p.jsonl"],
     {"p.jsonl": jsonl({**RECORD, "prompt": 5})}, "p.jsonl:1: 'prompt' must be a list"),
    ("prepare-chat-assistant-first", "prepare", [*P, "--format", "chat", "{tmp}/c.jsonl"],
     {"c.jsonl": jsonl({"messages": CHAT_OK}, {"messages": CHAT_OK[::-1]})}, "c.jsonl:2: message 0 is 'assistant'"),
    ("prepare-chat-two-users", "prepare", [*P, "--format", "chat", "{tmp}/c.jsonl"],
     {"c.jsonl": jsonl({"messages": [CHAT_OK[0], *CHAT_OK]})}, "c.jsonl:1: message 1 is 'user'"),
    ("prepare-chat-system-late", "prepare", [*P, "--format", "chat", "{tmp}/c.jsonl"],
     {"c.jsonl": jsonl({"messages": [*CHAT_OK, {"role": "system", "content": "Be brief."}]})},
     "c.jsonl:1: message 2: a system message may only come first"),
    ("prepare-pair-identical", "prepare", [*P, "--format", "preference", "{tmp}/p.jsonl"],
     {"p.jsonl": jsonl(RECORD, {**RECORD, "rejected": " Yes. "})}, "p.jsonl:2: 'chosen' and 'rejected' are the same"),
    ("prepare-pair-empty", "prepare", [*P, "--format", "preference", "{tmp}/p.jsonl"],
     {"p.jsonl": jsonl({**RECORD, "chosen": "  "})}, "p.jsonl:1: 'chosen' is empty"),
    ("prepare-pair-no-rejected", "prepare", [*P, "--format", "preference", "{tmp}/p.jsonl"],
     {"p.jsonl": jsonl(RECORD, {k: v for k, v in RECORD.items() if k != "rejected"})}, "p.jsonl:2: no key 'rejected'"),
    ("prepare-pair-unknown-rating", "prepare", [*P, "--format", "preference", "{tmp}/p.jsonl"],
     {"p.jsonl": jsonl({**RECORD, "rating": "much better"})}, "p.jsonl:1: unknown rating 'much better' (allowed:"),
    ("prepare-ranked-row-of-one", "prepare", [*P, "--format", "preference", "{tmp}/p.jsonl"],
     {"p.jsonl": jsonl({"prompt": RECORD["prompt"], "responses": ["Yes."]})},
     "p.jsonl:1: 'responses' must list at least two responses"),
    ("prepare-pair-margin-text", "prepare", [*P, "--format", "preference", "{tmp}/p.jsonl"],
     {"p.jsonl": jsonl({**RECORD, "margin": "big"})}, "p.jsonl:1: 'margin' must be a finite number"),
    ("score-bad-record", "score", ["--checkpoint", "{tmp}", "--input", "{tmp}/p.jsonl"], {"p.jsonl": "{oops\n"},
     "--checkpoint"),
    ("prepare-shard-tokens-nan", "prepare", [*P, "--shard-tokens", "nan", "{tmp}/t.jsonl"], {"t.jsonl": '{"text": "a"}\n'},
     "--shard-tokens"),
    ("prepare-shard-tokens-zero", "prepare", [*P, "--shard-tokens", "0", "{tmp}/t.jsonl"], {"t.jsonl": '{"text": "a"}\n'},
     "--shard-tokens"),
    ("prepare-workers-zero", "prepare", [*P, "--workers", "0", "{tmp}/t.jsonl"], {"t.jsonl": '{"text": "a"}\n'},
     "--workers"),
    ("prepare-input-missing", "prepare", [*P, "{tmp}/nope.jsonl"], {}, "nope.jsonl: no such file"),
    ("prepare-input-directory", "prepare", [*P, "{tmp}/d.jsonl"], {"d.jsonl/x": "x"}, "d.jsonl: no such file"),
    ("prepare-input-empty", "prepare", [*P, "{tmp}/e.jsonl"], {"e.jsonl": ""}, "no documents in"),
    ("prepare-input-binary", "prepare", [*P, "{tmp}/b.txt"], {"b.txt": b"\xff\xfe"}, "b.txt: not valid UTF-8"),
    ("prepare-tokenizer-empty", "prepare", ["--tokenizer", "{tmp}/tok.model", "--out", "{tmp}/out", "{tmp}/t.jsonl"],
     {"tok.model": "", "t.jsonl": '{"text": "a"}\n'}, "tok.model"),
    ("prepare-out-is-a-file", "prepare", ["--tokenizer", "byte", "--out", "{tmp}/f", "{tmp}/t.jsonl"],
     {"f": "x", "t.jsonl": '{"text": "a"}\n'}, "f: exists and is not a directory"),
    ("prepare-force-over-a-non-dataset", "prepare", ["--tokenizer", "byte", "--out", "{tmp}/home", "--force",
                                                    "{tmp}/t.jsonl"], {"home/notes.txt": "keep me", "t.jsonl": '{"text": "a"}\n'},
     "home: --force replaces a dataset"),
    ("prepare-out-under-a-file", "prepare", ["--tokenizer", "byte", "--out", "{tmp}/f/out", "{tmp}/t.jsonl"],
     {"f": "x", "t.jsonl": '{"text": "a"}\n'}, "out: cannot be created"),
    # dist-llama-plan, dist-llama-submit, dist-llama-generate, dist-llama-export (arguments that are not weights)
    ("plan-config-empty", "plan", ["--config", "{tmp}/e.yaml"], {"e.yaml": ""}, "e.yaml is empty"),
    ("plan-config-binary", "plan", ["--config", "{tmp}/b.yaml"], {"b.yaml": b"\x80\x81"}, "b.yaml is not UTF-8"),
    ("plan-gpus-not-a-number", "plan", ["--config", DEBUG, "--gpus", "abc"], {}, "--gpus"),
    ("plan-gpus-zero", "plan", [*PLAN, "--gpus", "0"], {}, "--gpus: must be a world size >= 1"),
    ("plan-memory-cap-nan", "plan", [*PLAN, "--search", "--memory-cap", "nan"], {}, "--memory-cap"),
    ("plan-top-zero", "plan", [*PLAN, "--search", "--top", "0"], {}, "--top"),
    ("plan-png-directory-missing", "plan", [*PLAN, "--search", "--png", "{tmp}/no/x.png"], {}, "--png"),
    ("submit-config-empty", "submit", ["--config", "{tmp}/e.yaml", "--dry-run"], {"e.yaml": ""}, "e.yaml is empty"),
    ("submit-cluster-binary", "submit", ["--config", DEBUG, "--cluster", "{tmp}/c.yaml", "--dry-run"],
     {"c.yaml": b"\x80\x81"}, "--cluster: "),
    ("submit-cluster-time-base60", "submit", ["--config", DEBUG, "--cluster", "{tmp}/c.yaml", "--dry-run"],
     {"c.yaml": "time: 48:00:00\n"}, "cluster.time: is the number 172800"),
    ("submit-time-override-base60", "submit", ["--config", DEBUG, "--cluster", "local", "cluster.time=48:00:00",
                                               "--dry-run"], {}, "cluster.time: is the number 172800"),
    ("submit-cluster-key-type", "submit", ["--config", DEBUG, "--cluster", "local", "cluster.exclude=5", "--dry-run"],
     {}, "cluster.exclude: wrong type"),
    ("submit-nodes-zero", "submit", ["--config", DEBUG, "--cluster", "local", "--nodes", "0", "--dry-run"], {},
     "--nodes"),
    # /proc looks writable to root (access(2)), but nothing can be created in it: found only when writing
    ("submit-run-dir-cannot-be-created", "submit", ["--config", DEBUG, "--cluster", "local", "--nodes", "1", "--cpu",
                                                    "--gpus-per-node", "2", "train.run_dir=/proc/dist-llama-test/run"],
     {}, "train.run_dir: "),  # root: found when writing; others: not writable in validation
    ("generate-prompt-file-binary", "generate", ["--checkpoint", "{tmp}", "--prompt-file", "{tmp}/p.txt"],
     {"p.txt": b"\xff\xfe\n"}, "--prompt-file"),
    ("generate-temperature-nan", "generate", ["--checkpoint", "{tmp}", "--prompt", "hi", "--temperature", "nan"], {},
     "--temperature"),
    ("generate-temperature-tiny", "generate", ["--checkpoint", "{tmp}", "--prompt", "hi", "--temperature", "1e-300"],
     {}, "--temperature"),
    ("generate-seed-overflow", "generate", ["--checkpoint", "{tmp}", "--prompt", "hi", "--seed", str(2**70)], {},
     "--seed"),
    ("generate-device-unknown", "generate", ["--checkpoint", "{tmp}", "--prompt", "hi", "--device", "tpu"], {},
     "--device"),
    ("export-max-shard-gb-nan", "export", ["--checkpoint", "{tmp}", "--out", "{tmp}/out", "--max-shard-gb", "nan"], {},
     "--max-shard-gb"),
    ("export-max-shard-gb-inf", "export", ["--checkpoint", "{tmp}", "--out", "{tmp}/out", "--max-shard-gb", "inf"], {},
     "--max-shard-gb"),
]
ARGS = {  # the override each row of the T prefix adds
    "lr-1e308": "optim.lr=1e308", "lr-nan": "optim.lr=nan", "eps-1e308": "optim.eps=1e308",
    "weight-decay-1e308": "optim.weight_decay=1e308", "seed-negative": "train.seed=-1",
    "eval-fraction-nan": "data.eval_fraction=nan", "seq-len-negative": "data.seq_len=-5",
    "data-path-directory": "data.path={tmp}", "dataset-meta-wrong-types": "data.path={tmp}/ds",
    "dataset-shard-outside": "data.path={tmp}/ds", "tokenizer-empty-file": "data.tokenizer={tmp}/tok.model",
    "init-from-not-weights": "checkpoint.init_from={tmp}", "override-without-value": "train.steps",
    "override-unresolved": "train.steps=${{oops}}",
}


def _main(command: str):
    if command == "train":
        from dist_llama.train.cli import main
    elif command == "prepare":
        from dist_llama.data.prepare import main
    elif command == "plan":
        from dist_llama.plan.cli import main
    elif command == "submit":
        from dist_llama.launch.slurm import main
    elif command == "generate":
        from dist_llama.generate import main
    elif command == "score":
        from dist_llama.score import main
    else:
        from dist_llama.weights.export import main
    return main


def run_command(command: str, args: list[str], capsys) -> tuple[int, str]:
    try:
        code = _main(command)(args)
    except SystemExit as exc:  # argparse, prepare
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_exit_2(row, tmp_path, capsys):
    name, command, args, files, expected = row
    for rel, content in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if name in ARGS:
        args.append(ARGS[name].replace("{tmp}", str(tmp_path)).replace("{{", "{").replace("}}", "}"))
    if command == "prepare":
        args = ["--workers", "1", "--quiet", *args] if "--workers" not in args else ["--quiet", *args]
    code, err = run_command(command, args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    if command == "train":
        assert not (tmp_path / "run" / "config.yaml").exists(), "a refused start wrote the run record"
    if name == "prepare-force-over-a-non-dataset":
        assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"
