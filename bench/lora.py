"""LoRA rounds vs full fine-tuning (issue 14): peak worker memory, round time, test perplexity.

Two lineages start from the same base model (the quality study's store setup: one SQLite
database and checkpoint directory each, the base imported once). Each runs N consecutive
rounds through the real pipeline (``records.create_round`` + ``run_round``) with the default
round parameters, ``update_method`` "full" in one and "lora" in the other; round ``i`` has
seed ``i`` in both, so both see the same prompt draws.

Every round runs in a fresh child process — what a worker holds for a round: the champion,
the candidate, training state — whose peak RSS (``VmHWM``, reset once the store is open),
wall seconds and CPU seconds (user + system, all threads) are recorded. After it, the
lineage's champion is measured with the quality study's code (:mod:`studies.quality.measure`)
on the domain's whole test split (and the unrelated corpus and a diversity probe, reported
in the JSON).

One invocation runs one round (the next one the method has not finished), so each fits a
short hold of a shared machine; ``--report`` prints the table and writes the JSON:

    flock /work/wt/heavy.lock .venv/bin/python -m bench.lora --method full   # x3
    flock /work/wt/heavy.lock .venv/bin/python -m bench.lora --method lora   # x3
    .venv/bin/python -m bench.lora --report
    .venv/bin/python -m bench.lora --small --all   # smoke: tiny:llama, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")

METHODS = ("full", "lora")
DEFAULT_WORK = Path(".bench-lora")
DEFAULT_OUT = Path("docs/bench/lora.json")
DEFAULT_MODEL = "bundled:smollm2-135m-instruct"


def _measure_cfg(small: bool, quick: bool = False) -> Any:
    from studies.quality.measure import SMALL_MEASURE, MeasureConfig

    if small:
        return SMALL_MEASURE
    if quick:
        # A fixed seeded sample of 24 of the test split's 81 passages (about a third of its
        # tokens); the unrelated corpus and the diversity probe only nominally.
        return MeasureConfig(
            test_passages=24, unrelated_passages=4, diversity_prompts=2, max_new_tokens=8
        )
    # The whole test split (the number the table reports); a smaller unrelated sample and
    # diversity probe than the quality study's, to keep each hold of the machine short.
    return MeasureConfig(
        test_passages=0, unrelated_passages=32, diversity_prompts=8, max_new_tokens=48
    )


# --quick: the default round with fewer prompts and evaluation passages, so that a round of
# each method fits one short hold of a shared machine. What sets the memory peak — model,
# batch_size, max_length, the optimizer, the meta-step's buffers — stays at the defaults.
QUICK_ROUND: dict[str, Any] = {"num_prompts": 8, "eval_passages": 12, "diversity_prompts": 8}


def _params(
    method: str, round_no: int, small: bool, quick: bool = False, sets: Sequence[str] = ()
) -> dict[str, Any]:
    """Defaults < --small/--quick sizes < --set KEY=V < --set METHOD:KEY=V."""
    from core.round_params import RoundParams
    from studies.quality.arms import SMALL_ROUND, parse_sets

    values: dict[str, Any] = dict(SMALL_ROUND) if small else {}
    if quick:
        values.update(QUICK_ROUND)
    if small:
        values["learning_rate"] = 3e-3  # a tiny random-init model: let the round move it
    common, per_method = parse_sets(sets, groups=METHODS)
    values.update(common)
    values.update(per_method.get(method, {}))
    values.update(update_method=method, seed=round_no)
    return RoundParams(**values).model_dump(mode="json")


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# --------------------------------------------------------------------------- child: one round


def child_round(root: Path, base_dir: Path, model: str, device: str, params: str) -> None:
    """Run one round in this process and print its measurements as one JSON line."""
    from bench.rss import proc_status, reset_peak
    from core.db import rounds as records
    from studies.quality.store import LINEAGE, open_arm_store
    from worker.rounds.pipeline import run_round

    settings, db = open_arm_store(root, base_dir, model, device, fresh=False)
    row = records.create_round(db, LINEAGE, json.loads(params))
    reset = reset_peak(os.getpid())
    rss0 = proc_status(os.getpid())["VmRSS"]
    before = resource.getrusage(resource.RUSAGE_SELF)
    load0 = _loadavg()
    started = time.perf_counter()
    error = None
    try:
        run_round(settings, db, row.id)
    except Exception as e:  # the round records its own failure; the bench reports it
        error = f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    status = proc_status(os.getpid())
    got = records.get_round(db, row.id)
    assert got is not None
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = {
        "round_id": row.id,
        "status": got.status,
        "decision": got.decision,
        "reason": got.reason,
        "error": error or got.error,
        "candidate_version": got.candidate_version,
        # VmHWM was reset to the RSS of the opened store; without the reset (older kernels)
        # it is the process's lifetime peak, which the round dominates anyway.
        "peak_rss_bytes": status["VmHWM"] if reset else after.ru_maxrss * 1024,
        "rss_at_start_bytes": rss0,
        "wall_s": wall,
        "cpu_s": cpu,
        "loadavg_before": load0,
        "loadavg_after": _loadavg(),
        "metrics": records.metrics_dict(got),
    }
    db.dispose()
    print("BENCH-LORA " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- parent


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.work: Path = a.work
        self.state_path = self.work / "results.json"
        self.state: dict[str, Any] = (
            json.loads(self.state_path.read_text())
            if self.state_path.exists()
            else {"rounds": {m: [] for m in METHODS}, "base": None}
        )
        # A run's overrides are fixed by its first round; later calls may leave them out.
        started = any(self.state["rounds"][m] for m in METHODS)
        recorded: list[str] = self.state.get("sets", [])
        if started and a.sets and a.sets != recorded:
            raise SystemExit(
                f"{self.work} was run with --set {recorded}, not {a.sets}; use another --work"
            )
        if started and not a.sets:
            a.sets = recorded
        self.state["sets"] = a.sets

    def save(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.state_path)

    def base_dir(self) -> Path:
        from studies.quality.store import prepare_base

        return prepare_base(self.work / "base", self.a.base_model, self.a.device)

    def measure(self, path: Path) -> dict[str, Any]:
        from studies.quality.measure import build_eval_sets, measure

        cfg = _measure_cfg(self.a.small, self.a.quick)
        sets = build_eval_sets(None, self.a.unrelated, cfg)
        return measure(path, self.a.device, sets, cfg)

    def ensure_base_measured(self, base_dir: Path) -> None:
        if self.state["base"] is None:
            log.info("measuring the base model")
            self.state["base"] = self.measure(base_dir)
            self.save()

    def next_round(self, method: str) -> bool:
        """Run and measure the method's next round; False when all are done."""
        from studies.quality.store import champion_after, finished_rounds, open_arm_store

        done: list[dict[str, Any]] = self.state["rounds"][method]
        if len(done) >= self.a.rounds:
            log.info("%s: all %d rounds done", method, self.a.rounds)
            return False
        base_dir = self.base_dir()
        self.ensure_base_measured(base_dir)
        root = self.work / method
        round_no = len(done) + 1
        _, db = open_arm_store(root, base_dir, self.a.base_model, self.a.device, False)
        rows = finished_rounds(db)  # closes a round an interrupted run left open
        db.dispose()
        if len(rows) != len(done):
            raise RuntimeError(
                f"{method}: the store at {root} has {len(rows)} finished rounds but the "
                f"results {len(done)}; delete {self.work} and start over"
            )
        params = json.dumps(_params(method, round_no, self.a.small, self.a.quick, self.a.sets))
        log.info("%s round %d/%d", method, round_no, self.a.rounds)
        cmd = [sys.executable, "-m", "bench.lora", "--child", str(root), str(base_dir)]
        cmd += ["--base-model", self.a.base_model, "--device", self.a.device, "--params", params]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH-LORA ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"{method} round {round_no}: child exited {proc.returncode}")
        result = json.loads(line.removeprefix("BENCH-LORA "))
        _, db = open_arm_store(root, base_dir, self.a.base_model, self.a.device, False)
        try:
            version, path, _ = champion_after(db, finished_rounds(db))
        finally:
            db.dispose()
        # An unchanged champion measures the same (deterministic): reuse the last numbers.
        last = done[-1] if done else {"champion_version": 1, "measure": self.state["base"]}
        same = last["champion_version"] == version
        result.update(
            round=round_no,
            champion_version=version,
            measure=last["measure"] if same else self.measure(path),
        )
        done.append(result)
        self.save()
        log.info(
            "%s round %d: %s, peak RSS %.2f GiB, %.0fs wall, %.0fs CPU, test ppl %.3f",
            method,
            round_no,
            result["decision"] or result["status"],
            result["peak_rss_bytes"] / 2**30,
            result["wall_s"],
            result["cpu_s"],
            result["measure"]["test_ppl"],
        )
        return True

    def run_within(self, budget_s: float) -> None:
        """Rounds in turn (the method with fewer done first, full on a tie) while the next
        one is expected to finish inside ``budget_s`` (its method's slowest round so far, or
        any method's before it has one, plus a fifth and a minute to measure); one round
        always runs."""
        started = time.perf_counter()
        took: dict[str, float] = {}
        ran = 0
        while True:
            counts = {m: len(self.state["rounds"][m]) for m in METHODS}
            method = min(METHODS, key=lambda m: counts[m])
            if counts[method] >= self.a.rounds:
                return
            mine = [r["wall_s"] for r in self.state["rounds"][method]] + [took.get(method, 0)]
            every = [r["wall_s"] for m in METHODS for r in self.state["rounds"][m]]
            expect = 1.2 * max(mine if max(mine) else every + list(took.values()) + [0]) + 60
            left = budget_s - (time.perf_counter() - started)
            if ran and expect > left:
                log.info("stopping: %s's next round needs ~%.0fs, %.0fs left", method, expect, left)
                return
            t0 = time.perf_counter()
            self.next_round(method)
            took[method] = time.perf_counter() - t0
            ran += 1

    def report(self) -> dict[str, Any]:
        base = self.state["base"]
        lines = [
            "| method | round | decision | ε | peak worker RSS | wall s | CPU s | update s "
            "| test ppl (after) | load avg (1 min, before→after) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        if base is not None:
            lines.append(f"| base | 0 | | | | | | | {base['test_ppl']:.3f} | |")
        for method in METHODS:
            for r in self.state["rounds"][method]:
                eps = r["metrics"].get("decide", {}).get("epsilon")
                lines.append(
                    f"| {method} | {r['round']} | {r['decision'] or r['status']} "
                    f"| {'' if eps is None else f'{eps:g}'} "
                    f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['wall_s']:.0f} "
                    f"| {r['cpu_s']:.0f} | {r['metrics'].get('update', {}).get('seconds', 0):.0f} "
                    f"| {r['measure']['test_ppl']:.3f} "
                    f"| {r['loadavg_before'][0]:.1f}→{r['loadavg_after'][0]:.1f} |"
                )
        table = "\n".join(lines)
        print(table)
        out = {
            "bench": "lora",
            "command": " ".join(["python -m bench.lora", *sys.argv[1:]]),
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "base_model": self.a.base_model,
            "rounds_per_method": self.a.rounds,
            "quick": self.a.quick,
            "sets": self.a.sets,
            "params": {m: _params(m, 1, self.a.small, self.a.quick, self.a.sets) for m in METHODS},
            "base": base,
            "rounds": self.state["rounds"],
            "table": table,
        }
        self.a.out.parent.mkdir(parents=True, exist_ok=True)
        self.a.out.write_text(json.dumps(out, indent=1) + "\n")
        return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from studies.quality.measure import DEFAULT_UNRELATED

    ap = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__)
    ap.add_argument("--method", choices=METHODS, help="run this method's next round")
    ap.add_argument("--all", action="store_true", help="run every round of both methods")
    ap.add_argument("--pair", action="store_true", help="run the next round of both methods")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="run rounds (full and lora in turn) while the next one should fit this many seconds",
    )
    ap.add_argument("--quick", action="store_true", help="fewer prompts and eval passages")
    ap.add_argument("--prepare", action="store_true", help="import and measure the base only")
    ap.add_argument("--report", action="store_true", help="print the table, write the JSON")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="round-parameter override for both methods or one (lora:learning_rate=2e-4); "
        "a run's rounds must all use the same overrides",
    )
    ap.add_argument("--small", action="store_true", help="tiny:llama, seconds (smoke)")
    ap.add_argument("--base-model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--unrelated", default=DEFAULT_UNRELATED)
    ap.add_argument("--child", nargs=2, metavar=("ROOT", "BASE_DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.base_model is None:
        a.base_model = "tiny:llama" if a.small else DEFAULT_MODEL
    return a


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a = parse_args(argv)
    if a.child:
        child_round(Path(a.child[0]), Path(a.child[1]), a.base_model, a.device, a.params)
        return 0
    bench = Bench(a)
    if a.prepare:
        bench.ensure_base_measured(bench.base_dir())
    if a.all:
        for _ in range(a.rounds):
            for method in METHODS:
                bench.next_round(method)
    elif a.pair:
        for method in METHODS:
            bench.next_round(method)
    elif a.budget_s:
        bench.run_within(a.budget_s)
    elif a.method:
        bench.next_round(a.method)
    if a.report or a.all:
        bench.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
