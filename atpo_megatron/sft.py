"""``atpo sft``: a short supervised warm start on demonstrations of the agent format.

    atpo sft examples/embedded_smollm2.yaml      # writes sft.out_dir, a Hugging Face folder
    atpo train examples/embedded_smollm2.yaml    # whose model.name_or_path is that folder

Why. The paper's 4-8B models follow the ``<think>/<search>/<answer>`` format from the prompt alone.
SmolLM2-135M does not: every leaf gets the format penalty -1, every tree has equal rewards, every
advantage is 0 and RL has nothing to learn from. A few supervised steps on demonstrations of the
format fix that; after them the leaves of a tree differ, and RL has a signal.

Demonstrations. One per training question that carries its reference hop chain (``metadata.hops``,
as the generated task's rows do, ``env.data``). Each is built exactly as the agent loop builds a
context: the prompt (``encode_prompt``), then per hop a turn ``<search> {hop query} </search>``
followed by the *real* retriever's answer to that query (``format_tool_result``, loss mask 0), then
``<answer> \\boxed{golden} </answer>`` and EOS. The first turn opens with :data:`THINK` (the format
check wants one ``<think>`` block). Only the turns are trained, with the loss mask RL uses.

Training. The Hugging Face model in one process: fp32 weights, AdamW, global-norm clipping
(``optimizer.clip_grad``), mean NLL over the trained tokens, linear warm-up then a constant lr. With
``model.dtype=bfloat16`` forward and backward run under bf16 autocast (bf16 matmuls were 8x faster
than fp32 on this project's AMX CPUs). It is a warm start for a small model; large models need none.

Output: ``sft.out_dir`` with the weights (safetensors), the tokenizer, and ``sft.json``: the spec it
was trained from and the loss of every step. A folder whose ``sft.json`` has the same spec is
reused without training (``--force`` retrains).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from atpo_megatron.config import Config, ConfigError, UserError, load_config, split_config_args
from atpo_megatron.env.data import embedded_task
from atpo_megatron.env.environment import search_client
from atpo_megatron.env.prompts import format_tool_result
from atpo_megatron.model_files import resolve_model

log = logging.getLogger("atpo.sft")

THINK = "<think> I need to search. </think>"
"""The reasoning of every demonstration's first turn."""
MANIFEST = "sft.json"
VERSION = 2
"""Bump when the demonstrations or their draw change (a cached folder is then retrained)."""


class DemonstrationError(UserError):
    """The training data cannot give demonstrations (no reference hop chain)."""


# ---------------------------------------------------------------------------------------------
# Demonstrations


def reference_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file that carry a reference hop chain (``metadata.hops`` with queries)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    usable = [r for r in rows if (r.get("metadata") or {}).get("hops")]
    if not usable:
        raise DemonstrationError(
            f"{path}: no row has metadata.hops (the reference search queries a demonstration needs); "
            "atpo sft builds demonstrations from the generated task (data.train_files=[embedded]) or from "
            'rows with "metadata": {"hops": [{"query": ...}, ...]}')
    return usable


def demonstration(tok, row: dict[str, Any], results: Sequence[str], prefix: str = "",
                  max_prompt_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """``(token ids, loss mask)`` of one demonstration; ``results`` are the retriever's texts, hop by hop."""
    from atpo_megatron.rollout.agent_loop import encode_prompt

    def enc(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False))

    ids = encode_prompt(tok, row["question"], max_prompt_tokens)
    head = enc(prefix) if prefix else []  # rollout.assistant_prefix: inserted, never trained
    ids, mask = ids + head, [0] * (len(ids) + len(head))
    for k, (hop, text) in enumerate(zip(row["metadata"]["hops"], results, strict=True)):
        turn = enc(f"{THINK} <search> {hop['query']} </search>" if k == 0 else f" <search> {hop['query']} </search>")
        obs = enc(format_tool_result(text))
        ids, mask = ids + turn + obs, mask + [1] * len(turn) + [0] * len(obs)
    final = enc(f" <answer> \\boxed{{{row['golden_answers'][0]}}} </answer>") + [tok.eos_token_id]
    return ids + final, mask + [1] * len(final)


def build_demonstrations(cfg: Config, tok, rows: Sequence[dict[str, Any]], search) -> list[tuple[list[int], list[int]]]:
    """Demonstrations of ``rows``; every hop query goes to the retriever in one batch."""
    queries = [hop["query"] for r in rows for hop in r["metadata"]["hops"]]
    results = search.search_batch(queries)
    failed = [q for q, res in zip(queries, results) if not res.ok]
    if failed:
        raise RuntimeError(f"the retriever failed on {len(failed)} demonstration queries (first: {failed[0]!r}): "
                           f"{next(res.error for res in results if not res.ok)}")
    texts, demos, at = [res.text for res in results], [], 0
    for r in rows:
        n = len(r["metadata"]["hops"])
        demos.append(demonstration(tok, r, texts[at:at + n], cfg.rollout.assistant_prefix,
                                   cfg.rollout.max_prompt_tokens))
        at += n
    return demos


# ---------------------------------------------------------------------------------------------
# Training


def nll(model, batch: Sequence[tuple[list[int], list[int]]], pad_id: int, autocast: bool) -> torch.Tensor:
    """Mean negative log-likelihood of the trained tokens (mask 1) of right-padded ``batch``.

    The logits are computed only where a trained token is predicted (the vocabulary is 49k wide).
    """
    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), n), dtype=torch.long)
    trained = torch.zeros((len(batch), n), dtype=torch.bool)
    for i, (d, m) in enumerate(batch):
        ids[i, :len(d)] = torch.tensor(d)
        attention[i, :len(d)] = 1
        trained[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    predicts = torch.zeros_like(trained)
    predicts[:, :-1] = trained[:, 1:]  # position t predicts token t + 1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
        logits = model.lm_head(hidden[predicts])
    return torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][trained[:, 1:]])


def draw_questions(rows: Sequence[dict[str, Any]], steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Row indices of every step's batch: the data sources (hop counts) take turns, the question within
    one is drawn at random. Sources are balanced so that a rare one (63 of the generated task's 500
    training questions are 3-hop) is not missing from a short warm start."""
    rng = random.Random(seed)
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_source.setdefault(str(r.get("data_source", "")), []).append(i)
    sources = sorted(by_source)
    draws = [rng.choice(by_source[sources[n % len(sources)]]) for n in range(steps * batch_size)]
    return [draws[k:k + batch_size] for k in range(0, len(draws), batch_size)]


def spec_of(cfg: Config) -> dict[str, Any]:
    """Everything the warm start depends on: a folder trained from the same spec is reused."""
    from atpo_megatron.env.data import GENERATOR_VERSION

    data = {"train_files": cfg.data.train_files}
    if "embedded" in cfg.data.train_files:
        data.update(embedded_seed=cfg.data.embedded_seed, generator_version=GENERATOR_VERSION)
    return {"version": VERSION, "sft": asdict(cfg.sft), "data": data, "dtype": cfg.model.dtype,
            "clip_grad": cfg.optimizer.clip_grad, "assistant_prefix": cfg.rollout.assistant_prefix,
            "retriever": {k: getattr(cfg.retriever, k) for k in ("backend", "corpus", "topk", "max_passage_chars")}}


def warm_start(cfg: Config, out_dir: Path, force: bool = False) -> dict[str, Any]:
    """Train ``sft.base_model`` on demonstrations and write it to ``out_dir``; returns the manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    s, spec = cfg.sft, spec_of(cfg)
    manifest = out_dir / MANIFEST
    if not force and manifest.is_file() and json.loads(manifest.read_text()).get("spec") == spec:
        log.info("%s already holds this warm start (same spec); reusing it (--force retrains)", out_dir)
        return json.loads(manifest.read_text())
    t0 = time.perf_counter()
    rows = [r for f in cfg.data.train_files
            for r in reference_rows(embedded_task(cfg).train if f == "embedded" else f)]
    picks = draw_questions(rows, s.steps, s.batch_size, s.seed)
    used = sorted({i for batch in picks for i in batch})
    base = resolve_model(s.base_model)
    tok = AutoTokenizer.from_pretrained(base)
    with search_client(cfg) as search:
        demos = dict(zip(used, build_demonstrations(cfg, tok, [rows[i] for i in used], search)))
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    autocast = cfg.model.dtype == "bfloat16"
    losses = []
    for step, batch in enumerate(picks, 1):
        ts = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = s.lr * min(1.0, step / max(1, s.warmup_steps))
        loss = nll(model, [demos[i] for i in batch], tok.pad_token_id, autocast)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_grad)
        opt.step()
        losses.append(loss.item())
        log.info("sft step %d/%d: loss %.3f (%.1fs)", step, s.steps, losses[-1], time.perf_counter() - ts)
    record = {"spec": spec, "base_model": str(base), "loss": losses, "demonstrations": len(used),
              "trained_tokens_per_step": sum(sum(demos[i][1]) for b in picks for i in b) / max(1, s.steps),
              "seconds": time.perf_counter() - t0}
    _publish(model.eval(), tok, base, record, out_dir)
    return record


def _publish(model, tok, base: Path, record: dict[str, Any], out_dir: Path) -> None:
    """Write the folder next to ``out_dir`` and swap it in, so a killed run never leaves half a model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if (base / "generation_config.json").is_file():
            shutil.copy(base / "generation_config.json", tmp / "generation_config.json")
        (tmp / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# CLI


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (omit for the defaults); its sft.* section applies")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides, e.g. sft.steps=10")
    parser.add_argument("--force", action="store_true", help="retrain even when sft.out_dir holds the same warm start")


def sft_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = load_config(*split_config_args(args.config, args.overrides))
    if not cfg.sft.out_dir:
        raise ConfigError("sft.out_dir is empty; name the folder the warm-started model goes to")
    out = Path(cfg.sft.out_dir)
    record = warm_start(cfg, out, force=args.force)
    print(f"warm start of {cfg.sft.base_model}: loss {record['loss'][0]:.3f} -> {record['loss'][-1]:.3f} over "
          f"{len(record['loss'])} steps ({record['seconds']:.0f}s); wrote {out}")
    return 0
