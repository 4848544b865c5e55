"""`python -m dist_llama.train` / `torchrun ... -m dist_llama.train --config X.yaml [key=value ...]`.

Exit codes: 0 finished; 2 bad configuration or input (one line on stderr: before any process group,
printed by local rank 0; a checkpoint the run cannot resume from; a shard changed after prepare, by
the rank that read it), or a run directory another live job holds (rank 0, before any process
group; the other ranks are then stopped by torchrun);
3 unrecoverable; 74 saving fails (a full disk: also for good, as a restart would fail the same way);
75 restart me (health abort, hang); 76 preempted (saved, requeue). See recovery.py.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import os
import sys
from typing import Optional, Sequence

import torch.distributed as dist

from dist_llama import config as config_lib
from dist_llama.config import EXIT_CONFIG, EXIT_FILE_ENV, Config, ConfigError
from dist_llama.config.errors import ArgumentParser as OneLineParser
from dist_llama.config.data_plan import sources_of, stages_of
from dist_llama.config.objectives import objective_spec
from dist_llama.data import DataError, build_tokenizer, open_dataset
from dist_llama.data.heldout import DataSources, eval_windows, split_held_out
from dist_llama.data.loader import Source
from dist_llama.parallel.env import init_distributed, world_size_from_env
from dist_llama.train.checkpoint import CheckpointError
from dist_llama.train.recovery import EXIT_INTERRUPTED, EXIT_OK, EXIT_SAVE_FAILED, EXIT_UNRECOVERABLE, TrainingExit
from dist_llama.train.reference_record import record_reference
from dist_llama.train.resume_check import check_run_dir
from dist_llama.train.runlock import RunDirInUse, RunLock, die_with_launcher, launched_by_torchrun, stop_launcher



FOR_GOOD = (EXIT_CONFIG, EXIT_UNRECOVERABLE, EXIT_SAVE_FAILED)
"""Exit codes no restart can change: written to the launcher's exit file, and torchrun's agent ended."""


def say(line: str) -> None:
    """One line on stderr in one write (print writes the newline apart): ranks sharing the console
    must not interleave mid-line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def report_final(code: int, reason: str, alone: bool = False) -> int:
    """Write the exit file (rank 0: every rank stops for the same reason; or this rank, `alone` to
    know it) and return the code."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path and code in FOR_GOOD and (alone or os.environ.get("RANK", "0") == "0"):
        try:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{code} {' '.join(reason.split())}\n")
            os.replace(tmp, path)
        except OSError as exc:  # the exit code still says it; the launcher may requeue once too many
            say(f"dist_llama: could not write {path}: {exc}")
    return code


def parse_args(argv: Optional[Sequence[str]]) -> tuple[Optional[str], list[str]]:
    parser = OneLineParser(
        prog="python -m dist_llama.train",
        description="Train a Llama model. Overrides: key=value or --key=value, e.g. train.steps=20.")
    parser.add_argument("--config", help="YAML preset (a path, or a name in configs/)")
    args, overrides = parser.parse_known_args(argv)
    return args.config, overrides


def resolve_config(config_path: Optional[str], overrides: Sequence[str], world_size: int):
    """Load and validate everything checkable without a process group. Raises ConfigError."""
    cfg = config_lib.to_object(config_lib.load(config_path, overrides))
    source = None
    if cfg.checkpoint.init_from:
        source = open_initial_weights(cfg)
        cfg.model = adopt_architecture(cfg.model, source, config_lib.explicit_keys(config_path, overrides))
    config_lib.validate_model(cfg.model)
    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
    except (ValueError, OSError) as exc:
        raise ConfigError("data.tokenizer", str(exc)) from None
    if source is not None and not cfg.checkpoint.init_from_vocab_remapped:
        check_init_tokenizer(source, cfg.data.tokenizer, tokenizer)
    sources = open_sources(cfg, tokenizer)
    cfg = config_lib.validate(cfg, world_size, sources[0].data if len(sources) == 1 else None, tokenizer.vocab_size)
    check_machine(cfg)
    seq_len = max(st.seq_len for st in stages_of(cfg))
    packs = objective_spec(cfg.train.objective).packs_windows
    for i, s in enumerate(sources.held_out if packs else ()):  # every validation of every stage has a window to read
        key = f"data.eval_sources[{i}].path" if cfg.data.eval_sources else "data.eval_fraction"
        if eval_windows(s.data, seq_len, 1) < 1:
            raise ConfigError(key, f"held-out source {s.name!r} has {len(s.data)} tokens, not one window of "
                                   f"seq_len+1 = {seq_len + 1}")
    from dist_llama.train.objectives import build_objective

    objective = build_objective(cfg)
    objective.check_inputs(tokenizer)
    try:  # every stage has windows to draw from every source it weighs; every pair fits a row
        objective.loader(sources, dp_rank=0, dp_size=cfg.parallel.dp)
    except ValueError as exc:
        key = "data.stages" if cfg.data.stages else "data.sources"
        if not packs:
            key = "data.seq_len" if "seq_len" in str(exc) else "data.path"
        raise ConfigError(key, str(exc)) from None
    if not packs and sources.held_out:  # every held-out pair fits a row too
        try:
            objective.evaluator(list(sources.held_out), 0, cfg.parallel.dp, None)
        except ValueError as exc:
            raise ConfigError("data.eval_sources[0].path", str(exc)) from None
    if source is not None:
        from dist_llama.weights.load import check_source

        check_source(source, cfg.model)  # the architecture (its tensors were checked when opened)
    if cfg.train.downstream_eval_interval:
        from dist_llama.train.downstream import check_downstream

        check_downstream(cfg.train)
    check_run_dir(cfg)
    return cfg, sources


def check_machine(cfg: Config) -> None:
    """float8 and async TP against the device this rank resolves to (and torchao for float8).
    The compute capability is read only when float8 asks for it: reading it initialises CUDA."""
    if not (cfg.train.float8 or cfg.parallel.async_tp):
        return
    import torch

    from dist_llama.parallel.float8 import missing_torchao

    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    capability = None
    if cuda and cfg.train.float8:
        capability = torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", "0")))
    config_lib.validate_device(cfg, "cuda" if cuda else "cpu", capability)
    if cfg.train.float8 and missing_torchao():
        raise ConfigError("train.float8", missing_torchao())


def open_sources(cfg: Config, tokenizer) -> DataSources:
    """The training sources and the held-out ones: data.eval_sources, or with data.eval_fraction the
    tail of each training source, which training then no longer reads."""
    def open_one(spec, key):
        try:
            return Source(spec.name, open_dataset(spec.path, tokenizer, cfg.data.cache_dir), spec.weight)
        except (ValueError, OSError) as exc:
            raise ConfigError(key, str(exc)) from None

    train = [open_one(spec, f"data.sources[{i}].path" if cfg.data.sources else "data.path")
             for i, spec in enumerate(sources_of(cfg))]
    _check_kinds(cfg, train)
    held_out = [open_one(spec, f"data.eval_sources[{i}].path") for i, spec in enumerate(cfg.data.eval_sources or [])]
    if not objective_spec(cfg.train.objective).packs_windows:  # e.g. pairs: held out only as a dataset of their own
        _check_kinds(cfg, held_out, "data.eval_sources[{}].path")
        return DataSources(train, held_out)
    if 0 < cfg.data.eval_fraction < 1 and not held_out:  # other values: validate names the key
        unsplit = []
        for source in train:
            try:
                source.data, tail = split_held_out(source.data, cfg.data.eval_fraction)
            except ValueError as exc:  # too few documents: trained on whole, not evaluated
                unsplit.append(f"source {source.name!r}: {exc}")
                continue
            held_out.append(Source(source.name, tail))
        if cfg.train.eval_interval and not held_out:
            raise ConfigError("data.eval_fraction", f"nothing to evaluate: {'; '.join(unsplit)}")
    return DataSources(train, held_out)


def _check_kinds(cfg: Config, sources: list[Source], key: str | None = None) -> None:
    """Data of the kind the objective reads (sft: chat, its loss mask; dpo: preference pairs), else exit 2."""
    need = objective_spec(cfg.train.objective).data_kind
    for i, s in enumerate(sources):
        kind = getattr(s.data, "kind", "text")
        if need is not None and kind != need:
            raise ConfigError(key.format(i) if key else f"data.sources[{i}].path" if cfg.data.sources else "data.path",
                              f"train.objective={cfg.train.objective} needs data prepared with dist-llama-prepare "
                              f"--format {need}; {s.name!r} is {kind} data")


def open_initial_weights(cfg: Config):
    from dist_llama.weights import WeightsError, open_weights

    try:
        return open_weights(cfg.checkpoint.init_from, max_seq_len=cfg.model.max_seq_len)
    except WeightsError as exc:
        raise ConfigError("checkpoint.init_from", str(exc)) from None


def check_init_tokenizer(source, spec: str, tokenizer) -> None:
    """init_from must have been trained with data.tokenizer's vocabulary, when it says which."""
    from dist_llama.weights.tokenizer_identity import tokenizer_mismatch

    theirs = tokenizer_mismatch(source, tokenizer)
    if theirs is not None:
        raise ConfigError("data.tokenizer", f"{spec} ({tokenizer.name}, {tokenizer.vocab_size} ids) is not the tokenizer "
                          f"checkpoint.init_from={source.path} was trained with: {theirs}; set "
                          "checkpoint.init_from_vocab_remapped=true if its embedding rows were re-mapped to this one")


def adopt_architecture(model, source, explicit: set[str]):
    """The checkpoint decides every architecture field the preset and overrides leave unset
    (vocab_size -1 included); the fields they set must agree with it (checked after validation)."""
    from dist_llama.weights.load import ARCHITECTURE_FIELDS

    taken = {}
    for field in ARCHITECTURE_FIELDS:
        key = f"model.{field}"
        unset = key not in explicit or (field == "vocab_size" and model.vocab_size == -1)
        if unset:
            taken[field] = getattr(source.args, field)
    return dataclasses.replace(model, **taken)


def train(cfg: Config, sources):
    """Train in an already-configured environment (torchrun env vars, or none for one process)."""
    from dist_llama.train.build import build_trainer

    # Rank 0 takes the run directory before anything is written to it and before any process group:
    # a second job on the same directory stops here (RunDirInUse) instead of training beside the first.
    lock = RunLock(cfg.train.run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        if lock is not None:
            record_reference(cfg)  # before any process group: hashing the weights waits for no peer
        env = init_distributed(cfg.train.device)
        trainer = build_trainer(cfg, env, sources)
        try:
            trainer.fit()
        finally:
            trainer.close()
    finally:
        if lock is not None:
            lock.release()
    return trainer


def main(argv: Optional[Sequence[str]] = None) -> int:
    return _main(argv)[0]


def _main(argv: Optional[Sequence[str]]) -> tuple[int, bool]:
    """The exit code, and whether this rank stopped alone (the other ranks did not see why)."""
    # A crash in native code (SIGSEGV, SIGABRT) prints every thread's Python stack to stderr: the one
    # clue such a crash leaves in a launcher's log. The process's own stderr: a caller's replacement
    # (a test capturing output) may have no file descriptor.
    faulthandler.enable(file=sys.__stderr__, all_threads=True)
    # Before anything touches CUDA: the caching allocator reads it once. Segments that grow in place
    # keep fragmentation near the 5% dist-llama-plan allows for (plan/allowances.py), as torchtitan
    # sets too; a value the user set wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    config_path, overrides = parse_args(argv)
    if launched_by_torchrun():  # no worker trains on, unsupervised, after its agent is gone
        die_with_launcher()
    try:
        cfg, sources = resolve_config(config_path, overrides, world_size_from_env())
    except ConfigError as exc:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # every rank finds it: once per node's console
            say(f"dist_llama: config error: {exc}")
        return report_final(EXIT_CONFIG, f"config error: {exc}"), False
    together = False  # every rank leaves at the same point: finished, or a collectively agreed exit
    alone = False  # this rank's own stop for good: its peers wait in a collective until the agent ends
    try:
        train(cfg, sources)
        together = True
    except TrainingExit as exc:
        together = True
        say(f"dist_llama: {exc.reason} (exit code {exc.code})")
        return report_final(exc.code, exc.reason), False
    except RunDirInUse as exc:  # no exit file: the directory (and its launcher files) is another job's
        say(f"dist_llama: {exc}")
        return EXIT_CONFIG, False
    except CheckpointError as exc:  # e.g. resuming a DeepSpeed checkpoint under another engine
        say(f"dist_llama: checkpoint error: {exc}")
        return report_final(EXIT_CONFIG, f"checkpoint error: {exc}"), False
    except DataError as exc:  # read by this rank only (failures.jsonl has it as the cause)
        alone = True
        say(f"dist_llama: data error: {exc}")
        return report_final(EXIT_CONFIG, f"data error: {exc}", alone=True), True
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one during the save
        say("dist_llama: interrupted (SIGINT) before a step boundary: nothing saved now")
        return EXIT_INTERRUPTED, False
    finally:
        # Left to the exit when alone: a group torn down now fails the peers' collectives, and they
        # would exit (and torchrun restart them) before this rank has ended the agent.
        if dist.is_initialized() and not alone:
            if together:
                # A gloo group torn down while a peer is still busy (a straggler's last step) has
                # aborted the process in C++ once ("terminate called without an active exception").
                dist.barrier()
            dist.destroy_process_group()
    return EXIT_OK, False


def run() -> None:
    """The command (`python -m dist_llama.train`, `dist-llama-train`): main(), then leave without the
    interpreter's teardown. Everything is flushed and closed by then; what teardown would still do is
    destroy leftover C++ objects (gloo devices and their threads) in no particular order, which has
    aborted a finished job ("terminate called without an active exception", SIGABRT after
    train_end) and turned its exit code 0 into a failure that torchrun restarts. A run that stopped for
    good (2, 3) also ends its torchrun agent, whose restarts would only stop the same way again."""
    code, alone = _main(None)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if code in FOR_GOOD:
        stop_launcher(end_agent=alone or os.environ.get("LOCAL_RANK", "0") == "0")
    os._exit(code)
