"""Mutation testing of the plugin's own code with mutmut (`make mutate`), bounded and resumable.

mutmut changes one thing at a time in the code (a `<` into `<=`, a `+` into `-`, a constant,
a dropped argument...) and runs the tests that reach the changed function: a mutant no test
notices ("survived") is a change of behaviour the tests cannot see.

- It runs in a copy of the work tree (`.mutation/`, git-ignored), never in the work tree
  itself: mutmut writes its mutants and a config file there, and the sources others are
  editing are never touched. Each run first brings the copy up to date (changed files only,
  so mutmut's cache of results stays valid for the code that did not change).
- Resumable: mutmut keeps every mutant's result in the copy; a rerun tests only mutants
  without one (new or changed code). `--fresh` starts over.
- Bounded: after `--budget` seconds mutmut is interrupted (it keeps what it finished) and
  the results so far are printed; run again to go on.
- Against the fast unit tests only (see FAST_TESTS_IGNORED): each mutant runs the tests that
  reached its function in mutmut's first, instrumented run of that test set.

    .venv/bin/python scripts/mutate.py --module vllm_frag_otel/core/layout.py --budget 900
    .venv/bin/python scripts/mutate.py --show            # the survivors' diffs, from the last run
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKDIR = REPO / ".mutation"
DEFAULT_MODULES = ["vllm_frag_otel/core", "vllm_frag_otel/plugin", "vllm_frag_otel/export", "vllm_frag_otel/analysis"]
# slow or environment-bound suites: end to end, other vLLM releases, vLLM's own suite, timing
FAST_TESTS_IGNORED = ["tests/e2e", "tests/test_vllm_versions.py", "tests/test_vllm_peer_suite.py",
                      "tests/test_reliability.py", "tests/test_benchmarks.py"]
# what mutmut's exit codes mean (mutmut's own table, status_by_exit_code)
STATUSES = ("killed", "survived", "no tests", "timeout", "suspicious", "skipped", "segfault",
            "caught by type check", "not checked", "check was interrupted by user")


def _tracked_files() -> list[str]:
    """The work tree's files as git sees them: tracked and untracked, not ignored."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                         capture_output=True).stdout.decode()
    return sorted(p for p in out.split("\0") if p and (REPO / p).is_file())


def sync(copy: Path) -> int:
    """Bring `copy` up to date with the work tree; returns how many files changed."""
    copy.mkdir(parents=True, exist_ok=True)
    wanted = set(_tracked_files())
    changed = 0
    for rel in wanted:
        src, dst = REPO / rel, copy / rel
        if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        changed += 1
    keep = {"mutants", "setup.cfg", ".pytest_cache", ".hypothesis"}
    for path in sorted(copy.rglob("*"), reverse=True):
        rel = path.relative_to(copy).as_posix()
        if rel.split("/")[0] in keep or "__pycache__" in rel.split("/"):
            continue
        if path.is_file() and rel not in wanted:
            path.unlink()
            changed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return changed


def _only_mutate(modules: list[str]) -> list[str]:
    """mutmut's only_mutate globs (paths as mutmut sees them, under its mutants/ copy)."""
    patterns = []
    for module in modules:
        module = module.rstrip("/")
        if module.endswith(".py"):
            patterns.append(module)
        else:
            patterns.append(f"{module}/*")
    return patterns


def write_config(copy: Path, modules: list[str], tests: list[str]) -> None:
    ignored = [f"--ignore={p}" for p in FAST_TESTS_IGNORED]
    lines = [
        "# written by scripts/mutate.py on every run: edit that script, not this file",
        "[mutmut]",
        "source_paths = vllm_frag_otel",
        "only_mutate =", *(f"    {p}" for p in _only_mutate(modules)),
        "do_not_mutate =", "    vllm_frag_otel/sim/*",
        "pytest_add_cli_args_test_selection =", *(f"    {t}" for t in tests), *(f"    {i}" for i in ignored),
        "pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -q",
        # vLLM's scheduler imports torch: forking from a process that ran the tests is not safe
        "process_isolation = forkserver",
        "use_git_change_detection = false",
        # a mutant's time limit is (its tests' time + this constant) x the multiplier: the constant
        # covers module fixtures (a `simulate` run takes ~20 s), which mutmut's estimate leaves out
        "timeout_constant = 40",
        "timeout_multiplier = 3.0",
        "also_copy =", "    deploy/", "    docs/", "    scripts/", "    requirements/", "    README.md",
        "    collector-config.yaml", "    benchmarks/",
        "",
    ]
    (copy / "setup.cfg").write_text("\n".join(lines))


def results(copy: Path) -> dict[str, list[str]]:
    """mutant name by status, from mutmut's `results --all true`."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=copy,
                         capture_output=True, text=True).stdout
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and status in STATUSES:
            found.setdefault(status, []).append(name)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", action="append", help="a module file or package directory to mutate"
                        f" (repeatable; default: {' '.join(DEFAULT_MODULES)})")
    parser.add_argument("--tests", action="append", help="test files or directories (default: tests/, without"
                        f" {', '.join(FAST_TESTS_IGNORED)})")
    parser.add_argument("--budget", type=float, default=1800, help="seconds before the run is interrupted"
                        " (it resumes where it stopped on the next run); default 1800")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results and start over")
    parser.add_argument("--show", action="store_true", help="only print the results of earlier runs, with the"
                        " diff of every survivor")
    parser.add_argument("--rerun", action="append", default=[], choices=STATUSES, metavar="STATUS",
                        help="test again the mutants of this status (e.g. survived, after adding a test);"
                        " repeatable")
    parser.add_argument("--json", type=Path, help="also write the counts and the mutant names by status here")
    args = parser.parse_args(argv)
    copy = WORKDIR
    if not args.show:
        if args.fresh and copy.exists():
            shutil.rmtree(copy)
        changed = sync(copy)
        write_config(copy, args.module or DEFAULT_MODULES, args.tests or ["tests/"])
        print(f"[mutate] {copy}: {changed} file(s) brought up to date; mutating {' '.join(args.module or DEFAULT_MODULES)}"
              f" for at most {args.budget:.0f} s", flush=True)
        # the tests' Hypothesis profile without shrinking (tests/conftest.py): a mutant needs one failing example
        env = {"HYPOTHESIS_PROFILE": "mutate", **os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        started = time.monotonic()
        again = [name for status in args.rerun for name in results(copy).get(status, [])] if args.rerun else []
        if args.rerun:
            print(f"[mutate] testing again {len(again)} mutant(s): {', '.join(args.rerun)}", flush=True)
            if not again:
                return 0
        proc = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs), *again],
                                cwd=copy, env=env, start_new_session=True)
        try:
            proc.wait(timeout=args.budget)
        except subprocess.TimeoutExpired:
            print(f"[mutate] budget of {args.budget:.0f} s spent: stopping (finished mutants are kept; run again"
                  " to go on)", flush=True)
            os.killpg(proc.pid, signal.SIGINT)  # mutmut stops its workers and saves what it has
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        print(f"[mutate] ran {time.monotonic() - started:.0f} s (mutmut exit code {proc.returncode})")
    found = results(copy)
    counts = {status: len(names) for status, names in sorted(found.items())}
    print("[mutate] results: " + (", ".join(f"{n} {s}" for s, n in counts.items()) or "none yet"))
    for name in found.get("survived", []):
        print(f"  survived: {name}")
        if args.show:
            shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=copy, capture_output=True,
                                   text=True).stdout
            print("    " + "\n    ".join(shown.rstrip().splitlines()))
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "mutants": found}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
