"""Turn trees as JSON and as a self-contained HTML page with one SVG picture per tree.

    write_trees_json(batch.trees, "trees.json", tokenizer)
    write_trees_html(batch.trees, "trees.html", tokenizer, stats=batch.stats)

The picture: the root (the prompt) on top, one row per turn below it. Internal nodes are circles
coloured by their turn entropy H (Eq. 2); leaves are squares coloured by their reward (red -1,
grey 0, green 1). Hovering a node shows its decoded text (observation, then action) and numbers;
under each picture every leaf's full response can be unfolded. No scripts, no external files.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from atpo_megatron.algo.tree import TurnTree

# viridis at 0, .25, .5, .75, 1
_VIRIDIS = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]
_REWARD = {-1.0: "#d62728", 0.0: "#9e9e9e", 1.0: "#2ca02c"}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")

X_STEP, Y_STEP, MARGIN, R = 34, 80, 30, 9
MAX_TITLE_CHARS = 3000


def _clean(text: str) -> str:
    """Text safe inside XML: no control characters (an SVG with them does not parse)."""
    return _CONTROL.sub("\ufffd", text)


def _esc(text: str) -> str:
    return html.escape(_clean(text), quote=True)


def _hex_to_rgb(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


def _mix(a: str, b: str, t: float) -> str:
    ra, rb = _hex_to_rgb(a), _hex_to_rgb(b)
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ra, rb))


def entropy_colour(h: float, h_max: float) -> str:
    """Viridis colour of entropy ``h`` on the scale [0, h_max]."""
    t = 0.0 if h_max <= 0 else min(max(h / h_max, 0.0), 1.0)
    k = min(int(t * 4), 3)
    return _mix(_VIRIDIS[k], _VIRIDIS[k + 1], t * 4 - k)


def reward_colour(r: float | None) -> str:
    """Red (-1) → grey (0) → green (1); white when the leaf has no reward."""
    if r is None:
        return "#ffffff"
    r = min(max(float(r), -1.0), 1.0)
    return _mix(_REWARD[0.0], _REWARD[1.0], r) if r >= 0 else _mix(_REWARD[0.0], _REWARD[-1.0], -r)


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False) if tokenizer is not None and ids else ""


def tree_to_json(tree: "TurnTree", tokenizer: Any = None) -> dict[str, Any]:
    """``tree.to_dict()`` plus, per node, its depth, leaf flag and decoded observation/action text."""
    d = tree.to_dict()
    leaves = set(tree.leaves())
    for i, node in enumerate(d["nodes"]):
        node["index"] = i
        node["depth"] = len(tree.path(i)) - 1
        node["is_leaf"] = i in leaves
        if tokenizer is not None:
            n = tree.nodes[i]
            node["observation_text"] = _decode(tokenizer, n.tokens[: n.obs_len])
            node["action_text"] = _decode(tokenizer, n.tokens[n.obs_len :])
    if tokenizer is not None:
        d["prompt_text"] = _decode(tokenizer, tree.prompt_ids)
    return d


def write_trees_json(trees: Sequence["TurnTree"], path: str | Path, tokenizer: Any = None,
                     stats: dict[str, float] | None = None) -> Path:
    """``{"stats": ..., "trees": [tree_to_json(t), ...]}``; ``TurnTree.from_dict`` reads each tree back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"stats": dict(stats or {}), "trees": [tree_to_json(t, tokenizer) for t in trees]}
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    return path


def _layout(tree: "TurnTree") -> dict[int, tuple[float, float]]:
    """Leaves at consecutive x in depth-first order, a parent centred over its children, y = depth."""
    pos: dict[int, tuple[float, float]] = {}
    next_x = [0]

    def place(i: int, depth: int) -> float:
        kids = tree.nodes[i].children
        if kids:
            xs = [place(c, depth + 1) for c in kids]
            x = (min(xs) + max(xs)) / 2
        else:
            x = next_x[0]
            next_x[0] += 1
        pos[i] = (MARGIN + R + x * X_STEP, MARGIN + R + depth * Y_STEP)
        return x

    place(0, 0)
    return pos


def _node_title(tree: "TurnTree", i: int, tokenizer: Any) -> str:
    n = tree.nodes[i]
    if i == 0:
        question = tree.meta.get("question", "")
        head = f"root (prompt, {len(tree.prompt_ids)} tokens)\nquestion: {question}\ngolden: {tree.meta.get('golden_answers', '')}"
        return head
    gen = sum(n.mask)
    lines = [
        f"node {i} · turn {len(tree.path(i)) - 1} · H = {n.entropy:.3f} · finish: {n.finish_reason or '-'}",
        f"tokens: {n.obs_len} observation + {len(n.tokens) - n.obs_len} action ({gen} generated) · tool calls so far: {n.tool_calls}",
    ]
    if n.reward is not None:
        lines.append(f"reward: {n.reward:g}")
    if tokenizer is not None:
        obs, act = _decode(tokenizer, n.tokens[: n.obs_len]), _decode(tokenizer, n.tokens[n.obs_len :])
        if obs:
            lines += ["--- observation ---", obs]
        lines += ["--- action ---", act]
    text = "\n".join(lines)
    return text if len(text) <= MAX_TITLE_CHARS else text[:MAX_TITLE_CHARS] + " …"


def tree_svg(tree: "TurnTree", tokenizer: Any = None, h_max: float | None = None) -> str:
    """One tree as a standalone ``<svg>`` element (valid XML)."""
    pos = _layout(tree)
    if h_max is None:
        h_max = max((n.entropy for n in tree.nodes[1:]), default=0.0)
    width = max(x for x, _ in pos.values()) + R + MARGIN
    height = max(y for _, y in pos.values()) + R + MARGIN + 14
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" class="tree" role="img">']
    for i, n in enumerate(tree.nodes[1:], start=1):
        (x1, y1), (x2, y2) = pos[n.parent], pos[i]
        out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#888" stroke-width="1.2"/>')
    leaves = set(tree.leaves())
    for i, n in enumerate(tree.nodes):
        x, y = pos[i]
        title = f"<title>{_esc(_node_title(tree, i, tokenizer))}</title>"
        if i == 0:
            out.append(f'<g class="node root"><circle cx="{x:.1f}" cy="{y:.1f}" r="{R + 2}" fill="#222"/>{title}</g>')
        elif i in leaves:
            out.append(f'<g class="node leaf"><rect x="{x - R:.1f}" y="{y - R:.1f}" width="{2 * R}" height="{2 * R}" '
                       f'fill="{reward_colour(n.reward)}" stroke="{entropy_colour(n.entropy, h_max)}" '
                       f'stroke-width="3"/>{title}</g>')
            label = {"eos": "", "tool": ""}.get(n.finish_reason, n.finish_reason[:6])
            if label:
                out.append(f'<text x="{x:.1f}" y="{y + R + 11:.1f}" font-size="8" text-anchor="middle" '
                           f'fill="#555">{_esc(label)}</text>')
        else:
            out.append(f'<g class="node"><circle cx="{x:.1f}" cy="{y:.1f}" r="{R}" '
                       f'fill="{entropy_colour(n.entropy, h_max)}" stroke="#333" stroke-width="0.8"/>{title}</g>')
    out.append("</svg>")
    return "\n".join(out)


def legend_svg(h_max: float) -> str:
    stops = "".join(f'<stop offset="{k / 4:.2f}" stop-color="{c}"/>' for k, c in enumerate(_VIRIDIS))
    parts = [
        '<svg xmlns="http://www.w3.org/2000/svg" width="560" height="54" class="legend" role="img">',
        f'<defs><linearGradient id="hgrad" x1="0" x2="1" y1="0" y2="0">{stops}</linearGradient></defs>',
        '<text x="0" y="14" font-size="12">turn entropy H (circles; leaf borders)</text>',
        '<rect x="0" y="20" width="200" height="12" fill="url(#hgrad)" stroke="#333" stroke-width="0.5"/>',
        '<text x="0" y="46" font-size="11">0</text>',
        f'<text x="200" y="46" font-size="11" text-anchor="end">{h_max:.2f}</text>',
        '<text x="260" y="14" font-size="12">leaf reward (squares)</text>',
    ]
    for k, (r, name) in enumerate(((-1.0, "-1 format"), (0.0, "0 wrong"), (1.0, "1 correct"))):
        x = 260 + k * 95
        parts.append(f'<rect x="{x}" y="20" width="12" height="12" fill="{reward_colour(r)}" stroke="#333" stroke-width="0.5"/>')
        parts.append(f'<text x="{x + 16}" y="31" font-size="11">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 20px; color: #222; }
h2 { font-size: 16px; margin: 28px 0 4px; }
.meta { font-size: 13px; color: #444; margin-bottom: 6px; }
.scroll { overflow-x: auto; border: 1px solid #ddd; padding: 4px; }
pre { white-space: pre-wrap; font-size: 12px; background: #f7f7f7; padding: 8px; }
table.stats { border-collapse: collapse; font-size: 12px; }
table.stats td { padding: 1px 10px 1px 0; }
g.node:hover circle, g.node:hover rect { stroke: #000; stroke-width: 3; }
"""


def trees_html(trees: Sequence["TurnTree"], tokenizer: Any = None, stats: dict[str, float] | None = None,
               title: str = "AT²PO turn trees") -> str:
    """A self-contained HTML page: statistics, legend, then per tree its picture and leaf texts."""
    h_max = max((n.entropy for t in trees for n in t.nodes[1:]), default=0.0)
    body = [f"<h1>{_esc(title)}</h1>"]
    if stats:
        rows = "".join(f"<tr><td>{_esc(k)}</td><td>{v:.4g}</td></tr>" for k, v in stats.items()
                       if isinstance(v, (int, float)))
        body.append(f'<details><summary>batch statistics</summary><table class="stats">{rows}</table></details>')
    body.append(legend_svg(h_max))
    for k, tree in enumerate(trees):
        leaves = tree.leaves()
        rewards = [tree.nodes[i].reward for i in leaves if tree.nodes[i].reward is not None]
        mean = f"{sum(rewards) / len(rewards):.3f}" if rewards else "-"
        body.append(f"<h2>tree {k}: {_esc(str(tree.meta.get('question', '')))}</h2>")
        body.append(f'<div class="meta">golden: {_esc(str(tree.meta.get("golden_answers", "")))} · source: '
                    f'{_esc(str(tree.meta.get("data_source", "")))} · {len(tree.nodes) - 1} turn nodes · '
                    f'{len(leaves)} leaves · mean reward {mean}</div>')
        body.append(f'<div class="scroll">{tree_svg(tree, tokenizer, h_max)}</div>')
        if tokenizer is not None:
            items = []
            for i in leaves:
                n = tree.nodes[i]
                text = _decode(tokenizer, tree.response(i)[0])
                items.append(f"<details><summary>leaf {i} · reward {n.reward} · {n.finish_reason} · "
                             f"{len(tree.path(i)) - 1} turns</summary><pre>{_esc(text)}</pre></details>")
            body.append("".join(items))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_trees_html(trees: Sequence["TurnTree"], path: str | Path, tokenizer: Any = None,
                     stats: dict[str, float] | None = None, title: str = "AT²PO turn trees") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(trees_html(trees, tokenizer, stats, title), encoding="utf-8")
    return path


def write_step_trees(out_dir: str | Path, step: int, trees: Sequence["TurnTree"], tokenizer: Any,
                     stats: dict[str, float]) -> None:
    """``<out_dir>/step_<step>.json`` and ``.html``: a training step's trees (``logging.save_tree_pictures``)."""
    out = Path(out_dir)
    write_trees_json(trees, out / f"step_{step:06d}.json", tokenizer, stats)
    write_trees_html(trees, out / f"step_{step:06d}.html", tokenizer, stats,
                     title=f"AT²PO turn trees, step {step} (rank 0's prompts)")
