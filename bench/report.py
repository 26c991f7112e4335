"""`make bench`'s end-to-end step: ``kangaroo-fast bench``, then what only a source checkout knows or needs.

    python bench/report.py [--doc docs/measurements.md] [any `kangaroo-fast bench` argument ...]

Runs the library's benchmark with the other arguments (``kangaroo_fast.cli.run_bench``: results JSON and Markdown),
then adds the checkout's git commit (and whether tracked code had uncommitted changes) to the JSON's ``machine``,
draws the speedup plot beside it (``.png``, matplotlib), and with ``--doc`` (or ``--readme``) rewrites that markdown
file's benchmark block (``make bench``: the one in docs/measurements.md) with the run's command, machine, tables
and plot. The library itself writes no document and asks no git: an installed wheel has neither.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_START = "<!-- bench:start: written by `make bench` (bench/report.py --doc), do not edit by hand -->"
README_END = "<!-- bench:end -->"


def git_info(root: Path = ROOT) -> dict:
    """``commit``: HEAD of the checkout at ``root``; ``dirty``: whether tracked files differ from it, leaving out
    what runs write (bench/results, README.md, docs/measurements.md). Both None outside a git checkout or without
    git."""
    try:
        run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=root, timeout=10)
        commit = run("rev-parse", "HEAD").stdout.strip() or None
        dirty = bool(run("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results",
                         ":(exclude)README.md", ":(exclude)docs/measurements.md").stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def check_readme(readme: Path) -> str:
    """The document's text; an error unless it has one benchmark block (checked before a long run, not after)."""
    readme = Path(readme)
    if not readme.is_file():
        raise FileNotFoundError(f"README {str(readme)!r} does not exist")
    text = readme.read_text(encoding="utf-8")
    if text.count(README_START) != 1 or text.count(README_END) != 1 or \
            text.index(README_START) > text.index(README_END):
        raise ValueError(f"{readme} needs one benchmark block: a line {README_START!r}, then a line {README_END!r}")
    return text


def update_readme(readme: Path, result: dict, paths: dict[str, Path]) -> None:
    """Replace the block between README_START and README_END with the run's command, machine, tables and plot."""
    from kangaroo_fast.benchmark import markdown_table

    readme = Path(readme)
    text = check_readme(readme)
    base = readme.resolve().parent
    rel = {k: os.path.relpath(Path(p).resolve(), base) for k, p in paths.items()}
    m = result["machine"]
    commit = (m.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if m.get("dirty") else "")
    threads = m["torch_threads"]
    where = m.get("gpu") or f"{m['cpu']}, {threads} thread{'s' if threads != 1 else ''}"
    block = "\n".join([
        README_START,
        f"`{result['command']}` on {where}; {result['model']}, {len(result['records']) // len(result['methods'])} "
        f"prompts; commit {commit}; torch {m['torch']}, transformers {m['transformers']}. "
        f"Results: [`{rel['json']}`]({rel['json']}).",
        "",
        markdown_table(result).rstrip("\n"),
        "",
        f"![speedup over HF greedy per category]({rel['plot']})",
        README_END])
    head, rest = text.split(README_START, 1)
    readme.write_text(head + block + rest.split(README_END, 1)[1], encoding="utf-8")


def plot_speedups(result: dict, path: Path) -> None:
    """Grouped bars: speedup over HF greedy per category (and overall), one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kangaroo_fast.benchmark import METHOD_LABELS

    summary, methods = result["summary"], result["methods"]
    categories = [c for c in summary if c != "overall"] + ["overall"]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(categories) + 2), 4.0))
    for i, m in enumerate(methods):
        values = [summary[c][m]["speedup_vs_hf"] or 0.0 for c in categories]
        ax.bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(categories))], values, width,
               label=METHOD_LABELS[m])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel("speedup over HF greedy")
    s = result["settings"]
    ax.set_title(f"{result.get('model', 'model')}, {s['dtype']} on {s['device']}, {s['max_new_tokens']} new tokens")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def complete(paths: dict[str, Path], git: dict, readme: Path | None = None) -> dict[str, Path]:
    """The bench tooling's part of a finished run: ``git`` into the JSON's machine, the plot beside the JSON, and
    the document's block when asked. Returns ``paths`` with the plot's."""
    result = json.loads(Path(paths["json"]).read_text())
    result["machine"].update(git)
    Path(paths["json"]).write_text(json.dumps(result, indent=1) + "\n")
    paths = {**paths, "plot": Path(paths["json"]).with_suffix(".png")}
    plot_speedups(result, paths["plot"])
    if readme is not None:
        update_readme(readme, result, paths)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", "--readme", dest="readme", type=Path, default=None,
                        help="rewrite this markdown file's benchmark block with the run's command, tables and plot")
    args, bench_argv = parser.parse_known_args(argv)

    from kangaroo_fast import cli

    bench_args = cli.build_parser().parse_args(["bench", *bench_argv])
    bench_args.argv = ["bench", *bench_argv]
    try:
        if args.readme is not None:
            check_readme(args.readme)
        git = git_info()  # the code that is measured, before the run writes anything
        paths = complete(cli.run_bench(bench_args), git, args.readme)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"bench/report.py: error: {err}", file=sys.stderr)
        return 2
    print("written: " + ", ".join(str(p) for p in paths.values()) + (f", {args.readme}" if args.readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
