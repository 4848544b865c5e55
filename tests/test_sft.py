"""Supervised fine-tuning (train.objective=sft): chat data prepared with the Llama 3 template, the
loss only on assistant tokens. The first-step loss equals Hugging Face transformers' masked
cross-entropy on the same tokens (each packed document run on its own), on one rank, FSDP-2 and
tp2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatdata import copy_task, llama3_tokenizer, write_chat
from trainrun import DEBUG, TINY
from dist_llama.testing import run_ranks


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(tokenizer file, prepared chat dataset directory)."""
    from dist_llama.data.prepare import prepare

    d = tmp_path_factory.mktemp("chat")
    tok = llama3_tokenizer(d / "tokenizer.json")
    prepare([str(write_chat(d / "chat.jsonl", 200))], tok, str(d / "data"), fmt="chat", progress=False)
    return tok, str(d / "data")


def test_chat_template_and_mask(chat):
    from dist_llama.data import build_tokenizer, open_dataset
    from dist_llama.data.chat import template_for

    tok_path, data = chat
    tok = build_tokenizer(tok_path)
    template = template_for(tok)
    assert template.name == "llama3" and template_for(build_tokenizer("byte")).name == "llama2"
    ids, mask = template.render([{"role": "user", "content": " hi "}, {"role": "assistant", "content": "red"}])
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>")
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("red") + [tok.special_id("<|eot_id|>")]
    assert mask[-1] == 2 and set(mask[:-1]) == {0, 1}
    ds = open_dataset(data, tok_path)
    assert ds.kind == "chat" and ds.n_docs == 200
    first = ds.tokens(0, int(ds.doc_starts[1]))
    assert tok.decode(first[ds.loss_mask(0, len(first)) > 0]) == copy_task(1)[0][1] + "<|eot_id|>"


def _hf_masked_loss(model_args, state_dict, batch) -> float:
    """transformers' Llama on each document of each row alone (what the document mask means),
    cross-entropy over the labels that are not -100, averaged over them."""
    import transformers

    from dist_llama.model.hf import to_hf_state_dict
    from dist_llama.weights.export import hf_config

    config = hf_config(model_args, torch.float32, None, 0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, attn_implementation="eager")).eval()
    hf.load_state_dict(to_hf_state_dict(state_dict, model_args), strict=True)
    logits = torch.empty(*batch["tokens"].shape, model_args.vocab_size)
    with torch.no_grad():
        for r in range(len(batch["tokens"])):
            for d in batch["doc_ids"][r].unique():
                cols = batch["doc_ids"][r] == d
                logits[r, cols] = hf(input_ids=batch["tokens"][r, cols][None],
                                     position_ids=batch["positions"][r, cols][None]).logits[0]
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).item()


def _first_loss(tok, data, overrides, world_size):
    import torch.distributed as dist

    from dist_llama.data.loader import PackedLoader
    from dist_llama.model import Transformer
    from dist_llama.parallel.env import init_distributed
    from dist_llama.train.build import build_trainer
    from dist_llama.train.cli import resolve_config

    cfg, sources = resolve_config(DEBUG, [*TINY, "checkpoint.enabled=false", "model.vocab_size=-1", "data.eval_fraction=0",
                                          f"data.tokenizer={tok}", f"data.path={data}", "train.objective=sft",
                                          *overrides], world_size)
    trainer = build_trainer(cfg, init_distributed("cpu"), sources)
    loss, _ = trainer.compute_gradients(trainer.p.loader.next_batch())
    trainer.close()
    out = {"loss": loss.item()}
    if dist.get_rank() == 0:
        torch.manual_seed(cfg.train.seed)
        model = Transformer(cfg.model)
        model.init_weights(cfg.train.seed)
        full = PackedLoader(sources, cfg.data.seq_len, cfg.train.global_batch_size, 0, 1, seed=cfg.train.seed,
                            loss_mask=True).next_batch()
        out["counted"], out["tokens"] = int((full["labels"] != -100).sum()), full["labels"].numel()
        out["reference"] = _hf_masked_loss(cfg.model, model.state_dict(), full)
    dist.destroy_process_group()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size,layout", [
    (1, []),
    (2, ["parallel.dp_shard=2"]),
    (2, ["parallel.tp=2", "parallel.dp_shard=1"]),
], ids=["1rank", "fsdp2", "tp2"])
def test_sft_first_loss_is_transformers_masked_cross_entropy(chat, world_size, layout):
    results = run_ranks(_first_loss, world_size, *chat, layout, world_size, timeout=200)
    ref = results[0]
    assert 0 < ref["counted"] < 0.2 * ref["tokens"]  # only the answers count
    for r in results:
        assert abs(r["loss"] - ref["reference"]) <= 1e-5 * ref["reference"], (r, ref)

