"""Run the differential fuzzer.

    python -m tests.fuzz --n 2000 [--family attention,ssd,scan,long_conv,map,triangular,delta] [--triton N] [--seed S]

For each family, ``--n`` programs on the default runtime and ``--triton`` programs with
``runtime="triton"`` under TRITON_INTERPRET=1.  Cases run in worker subprocesses, a batch at a
time, so a case that kills its process (a segfault in a kernel, an abort) is reported as a
crash and the run goes on with the next case.  Prints progress, every failure with its detail,
a summary table (statuses per family and spelling; a "+nan" / "+inf" variant counts with its
spelling), the near-miss reasons of the programs that were not rewritten, writes the failing cases with the command
that reproduces each to ``--failures`` and exits 1 if any case is wrong, crashed, timed out or
ran where the program raises.

    python -m tests.fuzz --only ssd:17 --seed 0           # re-run case 17 of ssd, with detail
    python -m tests.fuzz --only scan:3:triton --seed 0    # case 3 of the triton scan cases
    python -m tests.fuzz --n 40 --checkpoint               # each program inside torch.utils.checkpoint
    python -m tests.fuzz --n 40 --checkpoint selective     # ... with a policy (selective checkpointing)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict

#: family -> (module in tests.fuzz, generator function)
FAMILIES = {
    "attention": ("attention", "cases"),
    "ssd": ("recurrence", "ssd_cases"),
    "scan": ("recurrence", "scan_cases"),
    "long_conv": ("long_conv", "cases"),
    "map": ("map_loops", "cases"),
    "triangular": ("map_loops", "triangular_cases"),
    "delta": ("delta", "cases"),
}
FAILING = ("wrong", "crash", "eager_error_mismatch", "timeout")


def generator(family: str):
    """The family's ``cases(rng, n, triton)``, or None if its module is absent."""
    mod, fn = FAMILIES[family]
    try:
        module = importlib.import_module(f"{__package__}.{mod}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith(f".{mod}"):
            return None
        raise
    return getattr(module, fn)


def family_rng(seed: int, family: str, triton: bool) -> random.Random:
    return random.Random(f"{seed}:{family}:{'triton' if triton else 'default'}")


#: environment variable (set by ``--checkpoint``, inherited by the workers): every program runs inside
#: ``torch.utils.checkpoint.checkpoint`` (check.checkpointed): "1" plain, "selective" with a policy
CHECKPOINT = "SEQFUSE_FUZZ_CHECKPOINT"


def iter_cases(family: str, seed: int, n: int, triton: bool):
    gen = generator(family)
    if gen is None:
        return iter(())
    cases = gen(family_rng(seed, family, triton), n, triton)
    mode = os.environ.get(CHECKPOINT)
    if mode in ("1", "selective"):
        from .check import checkpointed
        return (checkpointed(c, selective=mode == "selective") for c in cases)
    return cases


def repro(family: str, index: int, seed: int, triton: bool) -> str:
    flag = {"1": " --checkpoint", "selective": " --checkpoint selective"}.get(os.environ.get(CHECKPOINT), "")
    return f"python -m tests.fuzz --only {family}:{index}{':triton' if triton else ''} --seed {seed}{flag}"


# --------------------------------------------------------------------------- worker

def worker(family: str, seed: int, n: int, triton: bool, start: int, stop: int) -> None:
    """Run cases [start, stop) of the family's n; one JSON line per case on stdout."""
    import warnings
    warnings.simplefilter("ignore")
    from .check import describe, run_case
    out = sys.stdout
    for i, case in enumerate(iter_cases(family, seed, n, triton)):
        if i < start:
            continue
        if i >= stop:
            break
        print(json.dumps({"begin": i}), file=out, flush=True)
        t0 = time.time()
        try:
            o = run_case(case)
            rec = {"i": i, "status": o.status, "detail": o.detail, "rewritten": o.rewritten}
        except Exception as exc:  # noqa: BLE001 - a fuzzer bug is reported, not fatal
            import traceback
            rec = {"i": i, "status": "crash", "detail": f"run_case raised {type(exc).__name__}: {exc}\n"
                                                     + traceback.format_exc(limit=8), "rewritten": False}
        rec.update(name=case.name, family=case.family, what=describe(case), seconds=round(time.time() - t0, 2))
        print(json.dumps(rec), file=out, flush=True)


def _spawn(family, seed, n, triton, start, stop, case_timeout):
    env = dict(os.environ)
    env.pop("SEQFUSE_STRICT", None)
    if triton:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", __package__, "--worker", family, "--seed", str(seed), "--n", str(n),
           "--start", str(start), "--stop", str(stop)] + (["--triton-worker"] if triton else [])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    return proc


def run_batch(family, seed, n, triton, start, stop, case_timeout, emit):
    """Run [start, stop) in subprocesses; a dead or hung worker costs one case. Yields records."""
    import selectors
    i = start
    while i < stop:
        proc = _spawn(family, seed, n, triton, i, stop, case_timeout)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        current, last = None, time.time()
        while True:
            if not sel.select(timeout=5):
                if current is not None and time.time() - last > case_timeout:
                    proc.kill()
                    proc.wait()
                    emit({"i": current, "status": "timeout", "family": family, "name": "?",
                          "detail": f"no result after {case_timeout}s", "what": "", "rewritten": False})
                    i = current + 1
                    break
                continue
            line = proc.stdout.readline()
            if not line:  # the worker exited
                proc.wait()
                err = proc.stderr.read()
                if current is not None:
                    emit({"i": current, "status": "crash", "family": family, "name": "?",
                          "detail": f"worker died (exit code {proc.returncode}) in this case:\n{err[-2000:]}",
                          "what": "", "rewritten": False})
                    i = current + 1
                elif proc.returncode != 0:
                    emit({"i": i, "status": "crash", "family": family, "name": "?",
                          "detail": f"worker failed before its first case (exit code {proc.returncode}):\n{err[-3000:]}",
                          "what": "", "rewritten": False})
                    i = stop
                else:
                    i = stop
                break
            last = time.time()
            rec = json.loads(line)
            if "begin" in rec:
                current = rec["begin"]
                continue
            current = None
            emit(rec)
            i = rec["i"] + 1
        sel.close()
        proc.stdout.close()
        proc.stderr.close()


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="programs per family on the default runtime")
    ap.add_argument("--family", default="attention,ssd,scan,long_conv,map,triangular,delta", help="comma-separated families")
    ap.add_argument("--triton", type=int, default=0, help="programs per family with runtime='triton' (interpreter)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=100, help="cases per worker process")
    ap.add_argument("--case-timeout", type=float, default=600.0, help="seconds before a silent case is a timeout")
    ap.add_argument("--failures", default="fuzz-failures.txt", help="where to write the failing cases")
    ap.add_argument("--only", help="FAMILY:INDEX[:triton] — run one case in this process and print it in full")
    ap.add_argument("--verbose", action="store_true", help="print every case")
    ap.add_argument("--checkpoint", nargs="?", const="plain", choices=["plain", "selective"],
                    help="run every program inside torch.utils.checkpoint (activation checkpointing); "
                         "'selective': with a policy (context_fn) saving the matmuls")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--triton-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.checkpoint:
        os.environ[CHECKPOINT] = "1" if args.checkpoint == "plain" else "selective"

    if args.worker:
        worker(args.worker, args.seed, args.n, args.triton_worker, args.start, args.stop)
        return 0

    if args.only:
        parts = args.only.split(":")
        family, index, triton = parts[0], int(parts[1]), len(parts) > 2 and parts[2] == "triton"
        if triton:
            os.environ["TRITON_INTERPRET"] = "1"
        os.environ.pop("SEQFUSE_STRICT", None)
        from .check import describe, run_case
        for i, case in enumerate(iter_cases(family, args.seed, index + 1, triton)):
            if i == index:
                print(describe(case))
                o = run_case(case)
                print(f"status: {o.status} (rewritten: {o.rewritten})\n{o.detail}")
                return 1 if o.status in FAILING else 0
        print(f"no case {index} in family {family}")
        return 2

    families = [f.strip() for f in args.family.split(",") if f.strip()]
    for f in families:
        if f not in FAMILIES:
            ap.error(f"unknown family {f!r}; families: {', '.join(FAMILIES)}")
    table: dict[tuple, Counter] = defaultdict(Counter)
    failures: list[str] = []
    totals = Counter()
    missed: Counter = Counter()
    t_start = time.time()

    for family in families:
        if generator(family) is None:
            print(f"[{family}] module tests/fuzz/{FAMILIES[family][0]}.py not present: skipped", flush=True)
            continue
        for triton, n in ((False, args.n), (True, args.triton)):
            if n <= 0:
                continue
            tag = f"{family}{' (triton)' if triton else ''}"
            done = Counter()

            def emit(rec, family=family, triton=triton, tag=tag, done=done, n=n):
                status = rec["status"]
                key = (family + (":triton" if triton else ""), rec.get("name", "?").split("+")[0])
                if status == "not_rewritten":
                    reasons = [ln.split(": ", 1)[1][:110] for ln in rec.get("detail", "").splitlines()
                               if ln.startswith("near miss")]
                    for reason in reasons or ["(no near miss recorded)"]:
                        missed[(family, reason)] += 1
                table[key][status] += 1
                done[status] += 1
                totals[status] += 1
                if status in FAILING or args.verbose:
                    print(f"[{tag} {rec['i']}] {status}: {rec.get('what', '')}\n    "
                          + rec.get("detail", "").replace("\n", "\n    "), flush=True)
                if status in FAILING:
                    failures.append(f"{status}\t{repro(family, rec['i'], args.seed, triton)}\t{rec.get('what', '')}\n"
                                    f"\t{rec.get('detail', '').splitlines()[0] if rec.get('detail') else ''}")
                k = sum(done.values())
                if k % 25 == 0 or k == n:
                    print(f"[{tag}] {k}/{n}  " + " ".join(f"{s}={c}" for s, c in sorted(done.items()))
                          + f"  ({time.time() - t_start:.0f}s)", flush=True)

            for b in range(0, n, args.batch):
                run_batch(family, args.seed, n, triton, b, min(n, b + args.batch), args.case_timeout, emit)

    statuses = sorted({s for c in table.values() for s in c})
    print("\nsummary (programs per status):")
    rows = [["family", "spelling", *statuses]]
    for (fam, name), c in sorted(table.items()):
        rows.append([fam, name, *(str(c.get(s, 0)) for s in statuses)])
    rows.append(["total", "", *(str(totals.get(s, 0)) for s in statuses)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if missed:
        print("\nnot rewritten, by near-miss reason (a program can have several):")
        for (fam, reason), c in missed.most_common(20):
            print(f"  {c:5d}  {fam}: {reason}")
    print(f"{sum(totals.values())} programs in {time.time() - t_start:.0f}s")
    if failures:
        with open(args.failures, "w") as f:
            f.write("\n".join(failures) + "\n")
        print(f"{len(failures)} failing case(s); reproduce with the commands in {args.failures}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
