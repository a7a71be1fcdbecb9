"""Cost of the policy losses per token: AT²PO's turn-level loss versus token-level ones.

    python benchmarks/loss.py                                           # CPU, seconds
    python benchmarks/loss.py --sequences 64 --tokens 8192 --turns 6    # one GPU: a mini-batch of paper length

Each loss runs forward + backward on ``[B, T]`` log-probs (B = ``--sequences``, T = ``--tokens``)
with ``--turns`` generated turns per row separated by masked tool results (a quarter of the row),
through ``algo.losses.policy_loss`` (numerator over count, as the trainer's schedule divides):

* ``plain``: the bare clipped token loss, ``mean(max(-A r, -A clip(r)))`` over masked tokens, in
  five lines, no input checks, no metrics: the floor any token loss pays;
* ``grpo``: the project's token-level PPO loss (dual clip, metrics, H_turn diagnostic);
* ``gspo``: one ratio per sequence; ``atpo``: one ratio per turn (turn ids, scatter sums, gather).

Reported: µs per token (all B*T positions) of forward + backward, and the ratio to ``plain``
and to ``grpo``. For scale, a train step of the 8B actor costs ~100 µs per token on one H200
(``../shared/notes/environment.md``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from atpo_megatron.algo import losses  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024, help="response positions per sequence")
    p.add_argument("--turns", type=int, default=4, help="generated turns per sequence")
    p.add_argument("--losses", default="plain,grpo,gspo,atpo")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    common.add_run_args(p, "loss")
    return p.parse_args(argv)


def make_batch(B: int, T: int, turns: int, device: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Rows of ``turns`` generated runs separated by masked gaps; gaps are a quarter of the row."""
    mask = torch.zeros(B, T)
    gap = max(1, T // (4 * max(turns - 1, 1))) if turns > 1 else 0
    run = max(1, (T - gap * (turns - 1)) // turns)
    for j in range(turns):
        start = j * (run + gap)
        mask[:, start:start + run] = 1
    old = -torch.rand(B, T, generator=generator) * 3
    logp = old + 0.01 * torch.randn(B, T, generator=generator)
    adv = torch.randn(B, generator=generator)[:, None].expand(B, T).contiguous()
    return {k: v.to(device) for k, v in dict(logp=logp, old=old, adv=adv, mask=mask).items()}


def plain_token_loss(logp, old, adv, mask, normalizer, clip=0.2):
    ratio = torch.exp(logp - old)
    token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    return (token * mask).sum() / normalizer


def step_fn(name: str, batch: dict[str, torch.Tensor]):
    mask = batch["mask"]

    def run():
        logp = batch["logp"].detach().requires_grad_()
        if name == "plain":
            loss = plain_token_loss(logp, batch["old"], batch["adv"], mask, mask.sum())
        else:
            numerator, count, _ = losses.policy_loss(name, logp, batch["old"], batch["adv"], mask)
            loss = numerator / count
        loss.backward()
        return loss

    return run


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet()
    common.setup_cpu_threads()
    gen = torch.Generator().manual_seed(args.seed)
    batch = make_batch(args.sequences, args.tokens, args.turns, args.device, gen)
    n = args.sequences * args.tokens
    rows = []
    for name in args.losses.split(","):
        times = common.time_it(step_fn(name, batch), args.device, repeat=args.repeat, warmup=args.warmup)
        t = min(times)
        rows.append({"loss": name, "us_per_token": 1e6 * t / n, "ms_per_call": 1e3 * t, "times": times})
    by = {r["loss"]: r for r in rows}
    for r in rows:
        for base in ("plain", "grpo"):
            if base in by:
                r[f"over_{base}"] = r["us_per_token"] / by[base]["us_per_token"]
    out = {"args": vars(args), "env": common.environment(args.device), "tokens": n,
           "masked_tokens": int(batch["mask"].sum().item()), "results": rows}
    print(f"policy loss forward+backward: {args.sequences} x {args.tokens} tokens, {args.turns} turns per row, "
          f"{out['env']['device']}")
    print(common.format_table(rows, [("loss", "loss", ""), ("us_per_token", "µs/token", ".4f"),
                                     ("ms_per_call", "ms/call", ".3f"), ("over_plain", "x plain", ".2f"),
                                     ("over_grpo", "x grpo", ".2f")]))
    common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
