"""Where T-SPMO's credit goes: each update's prefix tree, recorded, rebuilt and shown (paper §III-B/C, Eq. 7-10).

    python -m tinyrl.credit RUN                # where the credit landed, over every recorded step
    python -m tinyrl.credit RUN --step 12      # step 12's trees as text, and one HTML page to open in a browser

A T-SPMO run writes RUN/trees/step-NNNNNN.json.gz for every step (`--record-trees`, on by default): for the
fresh tree and each replay tree, the completions' token ids and rewards, for replay the source completion and
the cut, and every credited pair (A(v|p) != 0) as [completion i, position t, A(v|p), pi(v|p) at update time].
Everything else (the tree, E[R] at each node, every branch point) is rebuilt from the completions with
`PrefixTree`, the class the update itself used.

Where a token sits: the final answer is the last integer of the text with commas removed, the integer the
paper's reward reads (`tasks.parse_answer`). A token "is in the answer" when it is at or after the first
token that covers that integer's first character; so the end of a completion after its answer counts too.
A replay cut at m keeps tokens 0..m-1, so its tree's choices all sit in the answer when m >= that token.
"""
from __future__ import annotations

import bisect
import glob
import gzip
import html
import json
import os
import re
import statistics
import sys

from tinyrl import tasks
from tinyrl.cli import ArgParser, UserError, run_main
from tinyrl.objectives import PrefixTree

TREES = "trees"
END = "⟨end⟩"  # how a token with no text (end of sequence) is shown


# ----- the answer span and token offsets -----

def answer_span(tokenizer, ids: list[int]) -> tuple[int, int] | None:
    """Token positions [start, end) that cover the final answer's characters, or None when the text has no integer."""
    chars = tasks.answer_chars(tokenizer.decode(ids, skip_special_tokens=True))
    if chars is None:
        return None
    end_of = lambda t: len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True))  # noqa: E731
    first = bisect.bisect_right(range(len(ids)), chars[0], key=end_of)  # the first token that ends past its start
    last = bisect.bisect_left(range(len(ids)), chars[1], key=end_of)  # the first token that reaches its end
    return first, last + 1


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text (an end-of-sequence token's is empty)."""
    ends = [len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True)) for t in range(len(ids))]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return [text[a:b] for a, b in zip([0] + ends[:-1], ends)]


# ----- recording (the training loop) -----

def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def columns(trees: list[dict], tokenizer) -> dict:
    """One step's metrics.jsonl columns: where the fresh trees' credited pairs sit in their completions (mean
    relative position, 0 the first token and 1 the last; share in the answer), and for replay: the cut in
    tokens relative to the source's answer start (>= 0: every choice of the tree is an answer token), the
    share of cuts there, and the share of replay trees whose continuations all scored alike (no gradient)."""
    positions, in_answer = [], []
    for tree in (t for t in trees if t["kind"] == "fresh"):
        starts: dict[int, int | None] = {}
        for i, t, _, _ in tree["pairs"]:
            y = tree["completions"][i]
            if i not in starts:
                span = answer_span(tokenizer, y)
                starts[i] = None if span is None else span[0]
            positions.append(t / max(len(y) - 1, 1))
            in_answer.append(starts[i] is not None and t >= starts[i])
    replays = [t for t in trees if t["kind"] == "replay"]
    cuts = [tree["cut"] - span[0] for tree in replays if (span := answer_span(tokenizer, tree["source"]))]
    return {"credit_position": _mean(positions), "credit_in_answer": _mean(in_answer),
            "replay_cut_to_answer": _mean(cuts), "replay_cut_in_answer": _mean(c >= 0 for c in cuts),
            "replay_flat": _mean(len(set(tree["rewards"])) == 1 for tree in replays)}


def path(run: str, step: int) -> str:
    return os.path.join(run, TREES, f"step-{step:06d}.json.gz")


def save(run: str, step: int, trees: list[dict]) -> None:
    """Write one step's trees (gzip-compressed JSON; a kill leaves the old file or the new one)."""
    final = path(run, step)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with gzip.open(final + ".tmp", "wt") as f:
        json.dump({"step": step, "trees": trees}, f, separators=(",", ":"))
    os.replace(final + ".tmp", final)


def truncate(run: str, last_step: int) -> None:
    """Drop the records of steps after `last_step` (a resume re-runs them)."""
    for name in glob.glob(os.path.join(run, TREES, "step-*.json.gz*")):
        if int(os.path.basename(name)[5:11]) > last_step:
            os.remove(name)


def recorded_steps(run: str) -> list[int]:
    return sorted(int(os.path.basename(p)[5:11]) for p in glob.glob(os.path.join(run, TREES, "step-*.json.gz")))


def load(run: str, step: int) -> list[dict]:
    with gzip.open(path(run, step), "rt") as f:
        return json.load(f)["trees"]


# ----- reading one tree -----

class Reading:
    """One recorded tree rebuilt: the `PrefixTree` over its completions, each node's first (completion,
    position), the credited pairs by node, and the text of every token (replay: after the kept tokens)."""

    def __init__(self, record: dict, tokenizer):
        self.record, self.kept = record, record["source"][: record["cut"]] if record["kind"] == "replay" else []
        self.replay = record["kind"] == "replay"
        self.source_texts = token_texts(tokenizer, record["source"]) if self.replay else []
        self.tree = PrefixTree(record["completions"], record["rewards"])
        self.where: dict[int, tuple[int, int]] = {}
        for i, nodes in enumerate(self.tree.paths):
            for t, node in enumerate(nodes):
                self.where.setdefault(node, (i, t))
        self.credit = {self.tree.paths[i][t]: (a, pi) for i, t, a, pi in record["pairs"]}
        unique = {tuple(self.kept + y) for y in record["completions"]}  # the texts the reward read, each once
        texts = {y: token_texts(tokenizer, list(y))[len(self.kept):] for y in unique}
        spans = {y: answer_span(tokenizer, list(y)) for y in unique}
        full = [tuple(self.kept + y) for y in record["completions"]]
        self.texts = [texts[y] for y in full]
        self.answer = [None if spans[y] is None else (spans[y][0] - len(self.kept), spans[y][1] - len(self.kept))
                       for y in full]  # token positions after the kept part (< 0: the answer began in it)
        self.kept_texts = self.source_texts[: len(self.kept)]
        self.numbers: dict[int, tuple[list[tuple[int, int, int]], int | None]] = {}  # filled by `kind`

    def branch_points(self) -> list[int]:
        """Nodes with more than one child, root first, in order of depth."""
        nodes = [n for n, kids in enumerate(self.tree.children) if len(kids) > 1]
        return sorted(nodes, key=lambda n: (-1 if n == 0 else self.where[n][1], n))

    def depth(self, node: int) -> int:
        """Position of the tokens that follow `node` (the root is followed by position 0)."""
        return 0 if node == 0 else self.where[node][1] + 1

    def prefix_text(self, node: int) -> str:
        i, t = (0, -1) if node == 0 else self.where[node]
        return "".join(self.texts[i][: t + 1])

    def shared_prefix(self) -> int:
        """Length in tokens of the prefix every completion shares."""
        node, n = 0, 0
        while len(self.tree.children[node]) == 1 and self.tree.count[node] == self.tree.count[0]:
            node, n = next(iter(self.tree.children[node].values())), n + 1
        return n

    def kind(self, i: int, t: int) -> str:
        """Where token t of completion i sits (one of KINDS): in the final answer, after it, or before it; before
        it, a token of a number is told apart by that number's value: the final answer written earlier, an
        operand (for AxB problem ids), or another number (a step's result)."""
        span, text = self.answer[i], self.texts[i][t]
        if span is not None and t >= span[1] or text == "":
            return "after the answer"
        if span is not None and t >= span[0]:
            return "the answer"
        if re.search(r"\d", text):
            if i not in self.numbers:  # each completion's numbers (start, end, value) and final answer, once
                full = "".join(self.kept_texts + self.texts[i])
                self.numbers[i] = ([(m.start(), m.end(), int(m.group().replace(",", "")))
                                    for m in re.finditer(r"\d[\d,]*", full)], tasks.parse_answer(full))
            numbers, final = self.numbers[i]
            start = len("".join(self.kept_texts + self.texts[i][:t]))
            value = next((v for a, b, v in numbers if a < start + len(text) and start < b), None)
            operands = re.fullmatch(r"(\d+)x(\d+)", str(self.record["problem"]))
            if value is not None and value == final:
                return "number: the answer, written earlier"
            if operands and value in (int(operands[1]), int(operands[2])):
                return "number: an operand"
            return "number: another (a step)"
        return "word" if re.search(r"[^\W\d_]", text) else "symbol/space"

    def title(self) -> str:
        r = self.record
        right = sum(x >= 1.0 for x in r["rewards"])
        head = (f"{r['kind']} tree, problem {r['problem']} (answer {r['answer']}): {len(r['rewards'])} completions, "
                f"{right} scored 1; {len(self.tree):,} pairs, {len(r['pairs'])} credited")
        if r["kind"] == "replay":
            head += f"; cut at token {r['cut']} of a completion that scored {r['source_reward']:g}"
        return head


def _show(text: str, width: int = 60) -> str:
    text = text if len(text) <= width else "…" + text[-width:]
    return json.dumps(text, ensure_ascii=False)


def describe_tree(reading: Reading) -> str:
    """The text report of one tree: shared prefix, every branch point with its competing tokens (count, E[R],
    and A and pi where credited)."""
    tree, lines = reading.tree, [reading.title()]
    if reading.replay:
        lines.append(f"  kept prefix ({len(reading.kept)} tokens): {_show(''.join(reading.kept_texts), 200)}")
    n = reading.shared_prefix()
    lines.append(f"  shared prefix ({n} tokens): {_show(''.join(reading.texts[0][:n]), 200)}")
    points = reading.branch_points()
    if not reading.record["pairs"]:
        lines.append(f"  {len(points)} branch points; every completion scored "
                     f"{reading.record['rewards'][0]:g}, so every A is 0: no credit, no gradient")
        return "\n".join(lines)
    lines.append(f"  {len(points)} branch points (t = position of the competing tokens"
                 f"{', counted from the cut' if reading.replay else ''}):")
    for node in points:
        lines.append(f"    t={reading.depth(node)} after {_show(reading.prefix_text(node))}  "
                     f"E[R|p]={tree.expected_reward(node):.3f} over {tree.count[node]}")
        for child in sorted(tree.children[node].values(), key=lambda c: -tree.count[c]):
            i, t = reading.where[child]
            a_pi = reading.credit.get(child)
            credit = f"A={a_pi[0]:+.3f} pi={a_pi[1]:.3f}" if a_pi else "A=0"
            lines.append(f"      {_show(reading.texts[i][t] or END, 20):<14} x{tree.count[child]:<3} "
                         f"E[R]={tree.expected_reward(child):.3f}  {credit}  ({reading.kind(i, t)})")
    return "\n".join(lines)


# ----- the HTML page -----

CSS = """body{font-family:sans-serif;margin:2em;max-width:70em}pre{white-space:pre-wrap;margin:.2em 0;
font-family:monospace;border-bottom:1px solid #eee}.r{color:#666;font-size:.8em}.b{border-left:2px solid #06c}
.ans{text-decoration:underline dotted}.kept{color:#888}.cut{color:#c00;font-weight:bold}.drop{color:#bbb;
text-decoration:line-through}"""


def _color(a: float, top: float) -> str:
    alpha = 0.15 + 0.85 * min(1.0, abs(a) / top)
    return f"rgba(0,150,0,{alpha:.2f})" if a > 0 else f"rgba(210,0,0,{alpha:.2f})"


def tree_html(reading: Reading) -> str:
    """One tree as HTML: each distinct completion once (with how many times it was sampled), its credited tokens
    coloured by A (green > 0, red < 0; hover for A, pi, E[R]), tokens after a branch point marked by a blue bar,
    the answer underlined, and for replay the source completion with the cut."""
    r, tree, esc = reading.record, reading.tree, html.escape
    out = [f"<h2>{esc(reading.title())}</h2>"]
    if reading.replay:
        dropped = "".join(reading.source_texts[len(reading.kept):])
        out.append(f"<p>source completion, cut at ✂: <span class=kept>{esc(''.join(reading.kept_texts))}</span>"
                   f"<span class=cut>✂</span><span class=drop>{esc(dropped)}</span></p>")
    top = max((abs(a) for a, _ in reading.credit.values()), default=1.0) or 1.0
    seen: dict[tuple, int] = {}
    for y in r["completions"]:
        seen[tuple(y)] = seen.get(tuple(y), 0) + 1
    order = sorted(range(len(r["completions"])), key=lambda i: (-r["rewards"][i], r["completions"][i]))
    done = set()
    for i in order:
        key = tuple(r["completions"][i])
        if key in done:
            continue
        done.add(key)
        parts = [f"<span class=r>R={r['rewards'][i]:g} ×{seen[key]}</span> "]
        if reading.replay:
            parts.append(f"<span class=kept>{esc(''.join(reading.kept_texts))}</span><span class=cut>✂</span>")
        span = reading.answer[i]
        for t, node in enumerate(tree.paths[i]):
            text = reading.texts[i][t] or END
            classes = ["b"] if len(tree.children[tree.parent[node]]) > 1 else []
            if span is not None and span[0] <= t < span[1]:
                classes.append("ans")
            style, hint = "", f"t={t} n={tree.count[node]} E[R]={tree.expected_reward(node):.3f}"
            if node in reading.credit:
                a, pi = reading.credit[node]
                style, hint = f' style="background:{_color(a, top)}"', f"A={a:+.4f} pi={pi:.4f} " + hint
            if not classes and not style:
                parts.append(esc(text))
            else:
                cls = f' class="{" ".join(classes)}"' if classes else ""
                parts.append(f'<span{cls}{style} title="{esc(hint)}">{esc(text)}</span>')
        out.append(f"<pre>{''.join(parts)}</pre>")
    return "\n".join(out)


def page(title: str, readings: list[Reading]) -> str:
    """A self-contained page: inline CSS, no script, nothing fetched."""
    legend = ("<p>Credited tokens are coloured by A(v|p) = E[R|p∘v] − E[R|p]: green above 0, red below, stronger "
              "for larger |A|; hover a token for A, π at update time, its count n and E[R]. A blue bar marks a "
              "token chosen at a branch point; the final answer (the integer the reward reads) is underlined. "
              "Identical completions are shown once, with ×count.</p>")
    body = "\n".join(tree_html(r) for r in readings)
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{legend}{body}</body></html>")


# ----- over a whole run -----

KINDS = ("the answer", "after the answer", "number: the answer, written earlier", "number: an operand",
         "number: another (a step)", "word", "symbol/space")


def summary(run: str, steps: list[int], tokenizer) -> str:
    """Where the credit landed over `steps`: credited pairs and their |A| by where the token sits, fresh and replay
    apart; their mean relative position; replay cuts and flat replay trees; the tokens with the most |A|."""
    pairs = {kind: {"fresh": [0, 0.0], "replay": [0, 0.0]} for kind in KINDS}
    position = {"fresh": [], "replay": []}
    tokens: dict[tuple[str, str], list] = {}
    trees = {"fresh": 0, "replay": 0}
    cuts, flat = [], 0
    for step in steps:
        for record in load(run, step):
            reading, group = Reading(record, tokenizer), record["kind"]
            trees[group] += 1
            flat += group == "replay" and not record["pairs"]
            if group == "replay" and (span := answer_span(tokenizer, record["source"])):
                cuts.append(record["cut"] - span[0])
            for i, t, a, _ in record["pairs"]:
                kind, text = reading.kind(i, t), reading.texts[i][t] or END
                pairs[kind][group][0] += 1
                pairs[kind][group][1] += abs(a)
                whole = len(reading.kept) + len(record["completions"][i])
                position[group].append((len(reading.kept) + t) / max(whole - 1, 1))
                entry = tokens.setdefault((text, kind), [0, 0.0, 0.0])
                entry[0] += 1
                entry[1 if a > 0 else 2] += a

    def share(kind: str, group: str, column: int) -> str:
        total = sum(pairs[k][group][column] for k in KINDS)
        return f"{100 * pairs[kind][group][column] / total:5.1f}%" if total else "    -"

    n = {g: sum(pairs[k][g][0] for k in KINDS) for g in ("fresh", "replay")}
    lines = [f"{run}: {len(steps)} steps recorded ({steps[0]}-{steps[-1]}); {trees['fresh']} fresh trees, "
             f"{trees['replay']} replay trees; credited pairs (A != 0): {n['fresh']} fresh, {n['replay']} replay",
             "", "| where the credited token sits | fresh: pairs | fresh: share of |A| | replay: pairs | "
                 "replay: share of |A| |", "|---|---|---|---|---|"]
    for kind in KINDS:
        lines.append(f"| {kind if kind.endswith('answer') else 'before the answer: ' + kind} | "
                     f"{share(kind, 'fresh', 0)} | {share(kind, 'fresh', 1)} | {share(kind, 'replay', 0)} | "
                     f"{share(kind, 'replay', 1)} |")
    at_end = lambda g: f"{statistics.mean(position[g]):.2f}" if position[g] else "-"  # noqa: E731
    lines += ["", f"mean relative position of a credited pair (0 first token, 1 last): fresh {at_end('fresh')}, "
                  f"replay {at_end('replay')} (in the whole completion, kept tokens included)"]
    if trees["replay"]:
        inside = sum(c >= 0 for c in cuts)
        lines.append(f"replay: {inside} of {len(cuts)} cuts at or after the answer's first token (median "
                     f"{statistics.median(cuts) if cuts else '-'} tokens from it); {flat} of {trees['replay']} "
                     f"replay trees scored alike (no credit, no gradient)")
    lines += ["", "tokens carrying the most |A| (text, where, pairs, sum of A > 0, sum of A < 0):"]
    for (text, kind), (count, up, down) in sorted(tokens.items(), key=lambda kv: -(kv[1][1] - kv[1][2]))[:15]:
        lines.append(f"  {_show(text, 20):<14} {kind:<17} {count:>4}  {up:+.3f}  {down:+.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(description="Where T-SPMO's credit went: the recorded prefix trees of a run, as text and HTML.")
    p.add_argument("run", help="a T-SPMO run directory (its trees/ folder holds the records)")
    p.add_argument("--step", type=int, help="show this step's trees (default: a summary over every recorded step)")
    p.add_argument("--html", help="with --step: write the page here (default: RUN/credit-step-N.html)")
    p.add_argument("--model", help="the model whose tokenizer decodes the ids (default: the run's config.json)")
    args = p.parse_args(argv)
    steps = recorded_steps(args.run)
    if not steps:
        raise UserError(f"{args.run} holds no tree records ({os.path.join(args.run, TREES)}/ is missing or empty): "
                        f"only T-SPMO runs record trees, with --record-trees (the default)")
    if args.step is not None and args.step not in steps:
        raise UserError(f"step {args.step} was not recorded in {args.run}; recorded: {steps[0]}-{steps[-1]} "
                        f"({len(steps)} steps)")
    model = args.model
    if model is None:
        try:
            with open(os.path.join(args.run, "config.json")) as f:
                model = json.load(f)["model"]
        except (OSError, ValueError, KeyError):
            raise UserError(f"{args.run}/config.json does not name the model; pass --model") from None
    from tinyrl.model import load_tokenizer

    tokenizer = load_tokenizer(model)
    if args.step is None:
        print(summary(args.run, steps, tokenizer))
        return 0
    readings = [Reading(record, tokenizer) for record in load(args.run, args.step)]
    print(f"{args.run}, step {args.step}\n")
    print("\n\n".join(describe_tree(r) for r in readings))
    out = args.html or os.path.join(args.run, f"credit-step-{args.step}.html")
    with open(out, "w", encoding="utf-8") as f:
        f.write(page(f"{args.run}, step {args.step}", readings))
    print(f"\nwrote {out} (open it in a browser)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
