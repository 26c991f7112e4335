"""The documents point at what exists, and the README's headline tables say what their results files say.

Checked in README.md, docs/*.md and bench/results/README.md: every relative markdown link resolves to a file, every
``bench/results/<file>`` path named exists, and every table marked ``<!-- figures: <results file> table=<kind> -->``
equals, cell by cell, what the results JSON's summary gives when formatted as the benchmark's own tables format it
(tokens/s to one decimal, ratios and #MAT to two). Only json and the standard library: no model, no torch.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "results" / "README.md"]
README_MAX_LINES = 320
MEASUREMENTS = ROOT / "docs" / "measurements.md"  # holds the block `make bench` rewrites (bench/report.py --doc)
BENCH_START = "<!-- bench:start: written by `make bench` (bench/report.py --doc), do not edit by hand -->"
BENCH_END = "<!-- bench:end -->"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
RESULTS_PATH = re.compile(r"bench/results/[A-Za-z0-9_.\-]+\.(?:jsonl|json|md|png|csv)\b")
FIGURES = re.compile(r"<!--\s*figures:\s*(\S+)\s+table=(\S+)\s*-->")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
BACKTICKED = re.compile(r"`([^`]+)`")
NOT_SAID = re.compile(r"\bissue\s+#?\d+|\bsession\s+\d+|\bthe notes\b", re.I)


# ---- checks (each returns the problems it found, so that a test can show it fails) -------------------------------
def broken_links(text: str, base: Path) -> list[str]:
    """Relative links of markdown ``text`` (outside fenced code) that resolve to no file from folder ``base``."""
    problems = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path = target.split("#", 1)[0]
        if not (base / path).exists():
            problems.append(target)
    return problems


def missing_results(text: str, root: Path = ROOT) -> list[str]:
    """``bench/results/<file>`` paths named anywhere in ``text`` (code included) that do not exist under ``root``."""
    return sorted({p for p in RESULTS_PATH.findall(text) if not (root / p).is_file()})


def marked_tables(text: str) -> list[tuple[str, str, list[list[str]]]]:
    """(results file, kind, rows of cells) for every table right after a figures comment; row 0 is the header."""
    tables = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        mark = FIGURES.search(line)
        if not mark:
            continue
        rows = []
        for row in lines[i + 1:]:
            if not row.startswith("|"):
                break
            cells = [c.strip().replace("**", "") for c in row.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):  # the separator row
                rows.append(cells)
        tables.append((mark.group(1), mark.group(2), rows))
    return tables


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _method(cell: str) -> str:
    """The bench method a row is about: the last backticked name in its first cell."""
    names = BACKTICKED.findall(cell)
    if not names:
        raise ValueError(f"row {cell!r} names no method in backticks")
    return names[-1]


def _overall_cell(stats: dict, header: str) -> str:
    if header == "tokens/s":
        return f"{stats['tokens_per_s']:.1f}"
    if header == "× HF greedy":
        return _fmt(stats["speedup_vs_hf"])
    if header == "× vanilla":
        return _fmt(stats["speedup_vs_vanilla"])
    if header == "#MAT":
        return _fmt(stats["mean_accepted"])
    if header == "drafts/round":
        return _fmt(stats.get("drafts_per_round"))
    if header.startswith("acceptance"):
        return " ".join(f"{a:.2f}" for a in stats.get("acceptance_rate", [])) or "–"
    if header.startswith("= HF greedy"):
        return f"{stats['same_as_hf']}/{stats['samples']}"
    raise ValueError(f"column {header!r} has no rule: the table would carry figures nobody checks")


def _batch_cell(rows: list[dict], method: str, header: str) -> str:
    size = re.search(r"(\d+) request", header)
    if size is None:
        raise ValueError(f"column {header!r} has no rule: the table would carry figures nobody checks")
    row = [r for r in rows if r["method"] == method and r["batch_size"] == int(size.group(1))]
    if len(row) != 1:
        raise ValueError(f"{method} at batch {size.group(1)}: {len(row)} rows in the results")
    if header.startswith("tokens/s"):
        return f"{row[0]['tokens_per_s']:.1f}"
    if header.startswith("× vLLM"):
        return _fmt(row[0]["speedup_vs_vllm"])
    raise ValueError(f"column {header!r} has no rule: the table would carry figures nobody checks")


def expected_cell(result: dict, kind: str, method: str, header: str) -> str:
    """What the results ``result`` give for ``method`` in column ``header`` of a table of ``kind``: ``overall``
    (the run's overall statistics), ``category:<statistic>`` (one statistic per category column) or ``batch`` (the
    batch axis, a column per batch size)."""
    if kind == "overall":
        return _overall_cell(result["summary"]["overall"][method], header)
    if kind.startswith("category:"):
        return _fmt(result["summary"][header][method][kind.split(":", 1)[1]])
    if kind == "batch":
        return _batch_cell(result["batch"]["rows"], method, header)
    raise ValueError(f"table={kind!r} is not a kind of figures table (overall, category:<stat>, batch)")


def table_mismatches(text: str, root: Path = ROOT) -> list[str]:
    """Every cell of every figures table in ``text`` that differs from its results file, as 'file method column:
    table says X, results say Y'; an overall table must also show every method of its run."""
    problems = []
    for path, kind, rows in marked_tables(text):
        result = json.loads((root / path).read_text())
        header, body = rows[0], rows[1:]
        methods = [_method(r[0]) for r in body]
        if kind == "overall" and sorted(methods) != sorted(result["methods"]):
            problems.append(f"{path}: the table shows {methods}, the run has {result['methods']}")
        for method, row in zip(methods, body):
            if method not in result["methods"]:
                problems.append(f"{path}: {method} is not a method of this run")
                continue
            for column, cell in zip(header[1:], row[1:]):
                want = expected_cell(result, kind, method, column)
                if cell != want:
                    problems.append(f"{path} {method} {column!r}: table says {cell!r}, results say {want!r}")
    return problems


# ---- the documents ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_documents_exist():
    names = {p.relative_to(ROOT).as_posix() for p in DOCUMENTS}
    assert {"README.md", "docs/design.md", "docs/measurements.md", "bench/results/README.md"} <= names
    assert all(p.is_file() for p in DOCUMENTS)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    assert broken_links(doc.read_text(encoding="utf-8"), doc.parent) == []


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_results_files_exist(doc):
    assert missing_results(doc.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_documents_say_what_was_measured_not_who_or_which_ticket(doc):
    assert NOT_SAID.findall(doc.read_text(encoding="utf-8")) == []


def test_measurements_keep_the_block_make_bench_rewrites():
    text = MEASUREMENTS.read_text(encoding="utf-8")
    assert text.count(BENCH_START) == 1 and text.count(BENCH_END) == 1
    assert text.index(BENCH_START) < text.index(BENCH_END)


def test_the_readme_has_no_block_to_grow(readme):
    assert "<!-- bench:start" not in readme


def test_readme_is_a_guide_not_a_record(readme):
    assert len(readme.splitlines()) <= README_MAX_LINES


def test_readme_headline_tables_equal_their_results_files(readme):
    tables = marked_tables(readme)
    kinds = {kind for _path, kind, _rows in tables}
    assert "overall" in kinds, "the README's headline table carries no figures comment"
    assert all(len(rows) > 1 for _path, _kind, rows in tables)
    assert table_mismatches(readme) == []


def test_headline_names_its_results_file_as_a_link(readme):
    path = next(p for p, kind, _rows in marked_tables(readme) if kind == "overall")
    assert f"]({path})" in readme


# ---- the checks can fail --------------------------------------------------------------------------------------------
def test_a_changed_figure_is_caught(readme):
    path, _kind, rows = next(t for t in marked_tables(readme) if t[1] == "overall")
    row = next(r for r in rows[1:] if _method(r[0]) == "kangaroo")
    line = next(line for line in readme.splitlines() if line.startswith("|") and "(`kangaroo`)" in line)
    speed = row[1]
    changed = readme.replace(line, line.replace(f"| **{speed}** |", f"| **{float(speed) + 0.1:.1f}** |", 1)
                             .replace(f"| {speed} |", f"| {float(speed) + 0.1:.1f} |", 1))
    assert changed != readme
    problems = table_mismatches(changed)
    assert len(problems) == 1 and "kangaroo 'tokens/s'" in problems[0] and path in problems[0]


def test_a_dropped_method_and_an_unchecked_column_are_caught(readme):
    line = next(line for line in readme.splitlines() if line.startswith("|") and "(`lookup`)" in line)
    assert any("the run has" in p for p in table_mismatches(readme.replace(line + "\n", "", 1)))
    table = ("<!-- figures: bench/results/bench-avx512-shipped-l2-s18-cpu.json table=overall -->\n"
             "| method | tokens per second |\n|---|---|\n| HF (`hf`) | 22.6 |\n")
    with pytest.raises(ValueError, match="no rule"):
        table_mismatches(table)


def test_a_missing_file_is_caught(tmp_path):
    (tmp_path / "here.md").write_text("x")
    text = ("[ok](here.md) [gone](gone.md) [anchor](here.md#part) [web](https://example.com) [page](#top)\n"
            "```\n[in code](also-gone.md)\n```\n")
    assert broken_links(text, tmp_path) == ["gone.md"]
    assert missing_results("see bench/results/no-such-run-cpu.json and bench/results/demo.json") == [
        "bench/results/no-such-run-cpu.json"]


def test_a_ticket_number_is_caught():
    assert NOT_SAID.findall("as issue 12 asked, see the notes of session 3") == ["issue 12", "the notes", "session 3"]
