"""Pure helpers shared by the benchmarks: percentiles, the serving prompt mix, result rows with targets, the table.

No MindSpore, torch or HTTP here, so `tests/test_bench_tools.py` can test all of it quickly. A benchmark script
measures; `run_all.py` turns the measurements into `Row`s (ours, the reference measured in the same run, their
ratio, the issue's target) and formats them with `format_table` / `format_markdown`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.atomic_write import write_atomically

def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help shows the script's docstring: first paragraph as description, the rest after."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(description=head, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


# ---- statistics --------------------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default);
    None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---- the serving prompt mix --------------------------------------------------------------------------------


def draw_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """n prompt lengths, log-uniform in [lo, hi] (so as many prompts of 16-64 tokens as of 128-512), seeded.

    Log-uniform because real traffic has many short prompts and a tail of long ones; with 16..512 the median
    is ~90 tokens and the mean ~150.
    """
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= lo <= hi, got lo={lo} hi={hi}")
    rng = random.Random(seed)
    return [min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))) for _ in range(n)]


def token_windows(n_tokens: int, lengths: Sequence[int], seed: int) -> list[tuple[int, int]]:
    """(start, end) windows into a token stream of n_tokens, one per length, at seeded random offsets."""
    rng = random.Random(seed + 1)
    out = []
    for length in lengths:
        if length > n_tokens:
            raise ValueError(f"a {length}-token prompt does not fit a text of {n_tokens} tokens")
        start = rng.randrange(0, n_tokens - length + 1)
        out.append((start, start + length))
    return out


def make_prompts(
    token_ids: Sequence[int], lengths: Sequence[int], seed: int, decode: Callable[[Sequence[int]], str]
) -> list[str]:
    """Prompt texts: for each length a window of that many tokens of real text, decoded back to a string."""
    return [decode(token_ids[a:b]) for a, b in token_windows(len(token_ids), lengths, seed)]


# ---- result rows -------------------------------------------------------------------------------------------


@dataclass
class Target:
    """A target from the issue: `subject` ("ratio" = ours / reference, or "ours") `op` (">=" or "<=") threshold."""

    text: str
    op: str
    threshold: float
    subject: str = "ratio"

    def __post_init__(self) -> None:
        if self.op not in (">=", "<=", "<"):
            raise ValueError(f"op must be '>=', '<=' or '<', got {self.op!r}")
        if self.subject not in ("ratio", "ours"):
            raise ValueError(f"subject must be 'ratio' or 'ours', got {self.subject!r}")


@dataclass
class Row:
    """One line of the table. `ours`/`ref` are the numbers compared (ratio = ours / ref); `ours_text`/`ref_text`
    are how they are shown (a unit, a second number such as p50 next to p99, the reference's name)."""

    section: str
    what: str
    ours: float | None = None
    ref: float | None = None
    ours_text: str = ""
    ref_text: str = ""
    target: Target | None = None
    note: str = ""
    error: str | None = None
    ratio: float | None = field(default=None)

    def __post_init__(self) -> None:
        if self.ratio is None and self.ours is not None and self.ref:
            self.ratio = self.ours / self.ref

    @property
    def verdict(self) -> str:
        """'yes', 'NO, 23% short' / 'NO, 23% over', 'ERROR', or '' (no target / nothing measured)."""
        if self.error:
            return "ERROR"
        t = self.target
        if t is None:
            return ""
        value = self.ratio if t.subject == "ratio" else self.ours
        if value is None:
            return "not measured"
        return judge(value, t.op, t.threshold)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d


def judge(value: float, op: str, threshold: float) -> str:
    """'yes' when `value op threshold` holds, else how far it is missed, relative to the threshold."""
    if op == ">=":
        if value >= threshold:
            return "yes"
        return f"NO, {100 * (1 - value / threshold):.0f}% short"
    ok = value <= threshold if op == "<=" else value < threshold
    if ok:
        return "yes"
    return f"NO, {100 * (value / threshold - 1):.0f}% over"


def error_row(section: str, what: str, message: str) -> Row:
    first = message.strip().splitlines()[-1] if message.strip() else "failed"
    return Row(section, what, error=first[:300], ours_text="ERROR", note=first[:300])


# ---- number formatting -------------------------------------------------------------------------------------


def fmt(x: float | None, unit: str = "", digits: int | None = None) -> str:
    """A number with a sensible number of digits for a table (3 significant below 100, none above)."""
    if x is None:
        return "-"
    if digits is None:
        ax = abs(x)
        digits = 0 if ax >= 100 else 1 if ax >= 10 else 2 if ax >= 1 else 3
    s = f"{x:,.{digits}f}"
    return f"{s} {unit}".strip()


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


# ---- the table ---------------------------------------------------------------------------------------------

COLUMNS = ("what", "ours", "reference (same run)", "ours/ref", "target", "met")


def _cells(row: Row) -> list[str]:
    return [
        row.what,
        row.ours_text or fmt(row.ours),
        row.ref_text or (fmt(row.ref) if row.ref is not None else "-"),
        fmt_ratio(row.ratio) if not row.error else "-",
        row.target.text if row.target else "-",
        row.verdict or "-",
    ]


def format_table(rows: Sequence[Row], *, width_limit: int = 60) -> str:
    """A plain-text table, one block per section; error and note text follow their row, indented."""
    cells = [_cells(r) for r in rows]
    widths = [len(c) for c in COLUMNS]
    for cs in cells:
        for i, c in enumerate(cs):
            widths[i] = max(widths[i], min(len(c), width_limit))
    line = "  ".join(f"{c:<{widths[i]}}" for i, c in enumerate(COLUMNS))
    out = [line, "-" * len(line)]
    section = None
    for row, cs in zip(rows, cells):
        if row.section != section:
            section = row.section
            out.append(f"[{section}]")
        out.append("  ".join(f"{c:<{widths[i]}}" for i, c in enumerate(cs)).rstrip())
        if row.error:
            out.append(f"    error: {row.error}")
        elif row.note:
            out.append(f"    {row.note}")
    return "\n".join(out)


def format_markdown(rows: Sequence[Row]) -> str:
    """The same table in GitHub markdown, with a notes column."""
    head = list(COLUMNS) + ["notes"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            out.append(f"| **{section}** |" + " |" * (len(head) - 1))
        cs = _cells(row) + [row.error or row.note]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cs) + " |")
    return "\n".join(out)


# ---- files -------------------------------------------------------------------------------------------------


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a result file atomically: a reader (or a run killed meanwhile) sees the old file or the new one."""
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike | None, data: Any) -> None:
    """Atomic JSON write; a no-op for path None (a benchmark run without --json)."""
    if path:
        write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ---- the machine -------------------------------------------------------------------------------------------

# The vector extensions that decide CPU matmul speed, as /proc/cpuinfo names them, and how the header names them.
X86_EXTENSIONS = (("avx2", "AVX2"), ("fma", "FMA"), ("f16c", "F16C"), ("avx512f", "AVX-512F"),
                  ("avx512_vnni", "AVX-512 VNNI"), ("avx512_bf16", "AVX-512 BF16"), ("amx_tile", "AMX"),
                  ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"))
ARM_EXTENSIONS = (("asimd", "NEON"), ("asimddp", "dot product"), ("i8mm", "I8MM"), ("bf16", "BF16"),
                  ("sve", "SVE"), ("sve2", "SVE2"))


def cpuinfo_fields(cpuinfo: str) -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo text, keys lower-cased."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, ARM `Features`) from /proc/cpuinfo text."""
    f = cpuinfo_fields(cpuinfo)
    return frozenset((f.get("flags") or f.get("features") or "").split())


def cpu_summary(cpuinfo: str) -> str:
    """The CPU model and its vector extensions, for a results header: 'AMD EPYC (family 25, model 1); AVX2, FMA,
    F16C; no AVX-512, no AMX'."""
    f = cpuinfo_fields(cpuinfo)
    flags = cpu_flags(cpuinfo)
    if "model name" in f:
        name = f["model name"]
        if "cpu family" in f and "model" in f:
            name += f" (family {f['cpu family']}, model {f['model']})"
    elif "cpu implementer" in f:
        name = f"ARM CPU (implementer {f['cpu implementer']}, part {f.get('cpu part', '?')})"
    else:
        name = f.get("hardware") or "unknown CPU"
    if "flags" in f:
        found = [label for flag, label in X86_EXTENSIONS if flag in flags]
        missing = [label for flag, label in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_tile", "AMX"))
                   if flag not in flags]
    elif "features" in f:
        found = [label for flag, label in ARM_EXTENSIONS if flag in flags]
        missing = [label for flag, label in (("asimd", "NEON"), ("sve", "SVE")) if flag not in flags]
    else:
        return f"{name}; vector extensions unknown (no flags in /proc/cpuinfo)"
    parts = [name, ", ".join(found) or "no vector extensions"]
    if missing:
        parts.append(", ".join(f"no {m}" for m in missing))
    return "; ".join(parts)


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text, or '' where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


# ---- model sizes -------------------------------------------------------------------------------------------


def gpt2_param_count(n_layer: int, n_embd: int, vocab_size: int, n_positions: int) -> int:
    """Parameters of a GPT-2 with a tied LM head (124,439,808 for the 124M shape)."""
    d = n_embd
    per_layer = (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (2 * d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return vocab_size * d + n_positions * d + n_layer * per_layer + 2 * d


def kv_cache_bytes(n_layer: int, n_embd: int, slots: int, positions: int, dtype_bytes: int = 4) -> int:
    """K and V for every layer, slot and position."""
    return 2 * n_layer * slots * positions * n_embd * dtype_bytes
