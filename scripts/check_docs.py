"""Every command in the docs runs as written: a cheap check of each, one line per command.

    .venv/bin/python scripts/check_docs.py [--separate] [FILE.md ...]

The commands are the lines of the ```bash blocks of README.md and docs/*.md (comments dropped,
lines ending in a backslash joined). Each is checked without training or testing anything:

- ``cifar-lightning …`` runs with ``--print_config`` appended: the config and every option are
  parsed, nothing is trained. ``--print_config`` exits before the CLI opens ``--ckpt_path``, so
  this script checks what it skips: ``test``, ``validate`` and ``predict`` need a ``--ckpt_path``, and a
  checkpoint that names a file must load weights-only (``torch.load(weights_only=True)``);
- ``make X`` runs as ``make -n X``;
- ``.venv/bin/python scripts/compare_studies.py`` and ``scripts/time_to_accuracy.py`` really run
  (they only read run folders); every other script, the benchmarks and ``tensorboard`` get ``--help``;
- every argument that names a path must be in the repository (tracked, or untracked and not ignored:
  ``git ls-files --cached --others --exclude-standard``), unless it is what
  a documented command writes: ``lightning_logs/version_N/…`` and ``--ckpt_path last`` (a run of
  your own), the data folder ``../shared/cifar10`` or ``data``, and a script's output.

By default the Python commands run one after another in one interpreter (the venv's, running the
installed ``cifar-lightning`` entry point and each script as ``__main__``), which pays for the
imports of torch and Lightning once; ``--separate`` runs each in its own process instead. Exit
status 1 if any command failed.
"""

import argparse
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAKEFILE = (REPO / "Makefile").read_text()
BIN = Path(sys.executable).parent  # the venv's bin, as tests/helpers.py finds the entry point
FENCE = re.compile(r"^\s*```\s*([\w-]*)\s*$")
SHELL_BLOCKS = {"bash", "sh", "shell"}
SUBCOMMANDS = {"fit", "validate", "test", "predict"}  # the ones the docs may use
NEEDS_CHECKPOINT = {"validate", "test", "predict"}
REAL_RUNS = {"scripts/compare_studies.py", "scripts/time_to_accuracy.py"}  # they only read run folders
# Paths a script writes rather than reads: script → positional indices (the file must not exist yet:
# the script never overwrites) and options (a folder, made if missing).
WRITES_NEW = {"scripts/export_weights.py": {1}}
WRITES_INTO = {"scripts/dashboard_screenshots.py": {"--out"}}
DATA_DIRS = {"../shared/cifar10", "data"}  # the copy beside the checkout, or torchvision's download
RUN_FOLDER = re.compile(r"^(\./)?lightning_logs/version_(\d+|\*)(/|$)")
PATH_LIKE = re.compile(r"/|\.(ckpt|ya?ml|py|npz|csv|md|png|pt|pth)$")
PATH_OPTION = re.compile(r"(dir|path|config|logdir|out)$")  # options whose value is always a path
SHELL_OPERATORS = {"&&", "||", ";", "|", ">", ">>", "<", "&"}
PROGRAMS = {"cifar-lightning", "python", "python3", "tensorboard"}  # the venv's, bare or as .venv/bin/…


@dataclass
class Command:
    """One documented command: where it is, as written, and its words."""

    source: str
    text: str
    argv: list[str]
    error: str = ""  # why the line could not be split into words


@dataclass
class Check:
    """How a command is checked: ``problems`` found by reading it, then ``job`` to run (or none)."""

    command: Command
    how: str = ""
    problems: list[str] = field(default_factory=list)
    job: dict | None = None  # {"kind": "entry" | "script" | "process", "argv": [...], "load": [...]}


def extract(path: Path) -> list[Command]:
    """The commands of the shell blocks of a markdown file."""
    commands, block, pending, start = [], None, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence and (block is None or not fence[1]):
            block = None if block is not None else ("shell" if fence[1] in SHELL_BLOCKS else "other")
            continue
        if block != "shell":
            continue
        stripped = line.strip()
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text, pending = (pending + stripped).strip(), ""
        source = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{start}"
        try:
            argv = shlex.split(text, comments=True)
        except ValueError as err:  # e.g. an unclosed quote
            commands.append(Command(source, text, [], f"cannot split it into words ({err})"))
            continue
        if argv:
            commands.append(Command(source, shlex.join(argv), argv))
    return commands


def shipped_paths() -> tuple[set[str], set[str]] | None:
    """The files a clone holds once the working tree is committed, and their folders: tracked files and
    untracked ones git does not ignore (``git ls-files --cached --others --exclude-standard``); None
    outside a git checkout."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    files = set(filter(None, listed.split("\0")))
    folders = {parent.as_posix() for name in files for parent in Path(name).parents if parent != Path(".")}
    return files, folders | {"."}


SHIPPED = None


def in_repository(value: str) -> bool:
    """``value`` (relative to the checkout, globs allowed) names a committed file or folder present here."""
    global SHIPPED
    if SHIPPED is None:
        SHIPPED = shipped_paths() or (set(), set())
    files, folders = SHIPPED
    if not files:  # not a git checkout: what is here is what was shipped
        return any(REPO.glob(value)) if any(c in value for c in "*?[") else (REPO / value).exists()
    name = os.path.normpath(value).replace(os.sep, "/")
    if any(c in name for c in "*?["):
        return any(fnmatch.fnmatch(f, name) for f in files | folders)
    return (name in files or name in folders) and (REPO / name).exists()


def path_problem(value: str) -> str | None:
    """Why a path read by a documented command would be missing on a fresh clone, or None."""
    if RUN_FOLDER.match(value) or value.rstrip("/") in DATA_DIRS:
        return None  # written by a documented command, or the documented data folder
    if in_repository(value):
        return None
    where = "it is here, but git ignores it, so a clone lacks it" if (REPO / value).exists() else "it does not exist"
    return f"{value} is not in the repository ({where})"


def _value(token: str) -> str:
    """The path part of an argument: ``LABEL=FOLDER`` gives the folder."""
    return token.rpartition("=")[2] if "=" in token else token


def _options(args: list[str]) -> list[tuple[str | None, str]]:
    """``(option or None, value)`` for each value of ``args``: ``--opt value``, ``--opt=value``, positionals."""
    pairs, option = [], None
    for token in args:
        if token.startswith("--"):
            if option is not None:
                pairs.append((option, ""))  # a flag
            name, equals, value = token.partition("=")
            option = None
            if equals:
                pairs.append((name, value))
            else:
                option = name
        else:
            pairs.append((option, token))
            option = None
    if option is not None:
        pairs.append((option, ""))
    return pairs


def _read_paths(check: Check, pairs: list[tuple[str | None, str]], skip=()) -> None:
    for index, (option, value) in enumerate(pairs):
        if index in skip or option in skip or not value or value.startswith("-") or "://" in value:
            continue
        path = value if option and PATH_OPTION.search(option) else _value(value)
        if path and (PATH_LIKE.search(path) or (option and PATH_OPTION.search(option))) and \
                (problem := path_problem(path)):
            check.problems.append(problem)


def plan(command: Command) -> Check:
    """How to check ``command`` cheaply; problems found by reading it."""
    check = Check(command)
    argv = command.argv
    if command.error:
        check.problems.append(command.error)
        return check
    if operators := SHELL_OPERATORS.intersection(argv):
        check.problems.append(f"shell operators {sorted(operators)}: write one command a line")
        return check
    program = argv[0].removeprefix("./")
    venv_program = program.removeprefix(".venv/bin/")
    if program == "make":
        check.how = "make -n " + " ".join(argv[1:])
        check.job = {"kind": "process", "argv": ["make", "-n", *argv[1:]]}
    elif venv_program not in PROGRAMS or (program != venv_program and "VENV ?= .venv\n" not in MAKEFILE):
        # `.venv/bin/…` is the venv `make` sets up by default (CI runs it as .venv-ci): run with this one.
        check.problems.append(f"no check for {argv[0]!r}: document make, cifar-lightning, .venv/bin/python or "
                              f".venv/bin/tensorboard commands")
    elif venv_program == "cifar-lightning":
        _plan_cli(check, argv[1:])
    elif venv_program == "tensorboard":
        _read_paths(check, _options(argv[1:]))
        check.how = "tensorboard --help"
        check.job = {"kind": "process", "argv": [str(BIN / "tensorboard"), "--help"]}
    else:
        _plan_script(check, argv[1:])
    return check


def _plan_cli(check: Check, args: list[str]) -> None:
    pairs = _options(args)
    subcommand = args[0] if args else ""
    if subcommand.startswith("-") and subcommand in ("--help", "-h"):
        check.how, check.job = "run as written", {"kind": "entry", "argv": args, "load": []}
        return
    if subcommand not in SUBCOMMANDS:
        check.problems.append(f"cifar-lightning {subcommand!r} is not one of the documented subcommands "
                              f"{sorted(SUBCOMMANDS)}")
        return
    checkpoints = [value for option, value in pairs if option == "--ckpt_path"]
    if subcommand in NEEDS_CHECKPOINT and not checkpoints:
        check.problems.append(f"{subcommand} without --ckpt_path: the CLI refuses it (--print_config does not check)")
    load = []
    for value in checkpoints:
        if value == "last" or RUN_FOLDER.match(value):
            continue  # a run of your own: written by the fit before it
        if problem := path_problem(value):
            check.problems.append(problem)
        elif (REPO / value).is_file():
            load.append(value)
    _read_paths(check, pairs, skip={"--ckpt_path"})
    extra = [] if {"--print_config", "--help", "-h"} & set(args) else ["--print_config"]
    check.how = " ".join(["cifar-lightning … --print_config" if extra else "run as written",
                          *(f"+ load {path} weights-only" for path in load)])
    check.job = {"kind": "entry", "argv": [*args, *extra], "load": load}


def _plan_script(check: Check, args: list[str]) -> None:
    if not args:
        check.problems.append("python without a script")
        return
    script, rest = args[0].removeprefix("./"), args[1:]
    if not in_repository(script):
        check.problems.append(path_problem(script) or f"{script} is missing")
        return
    pairs = _options(rest)
    positional = [index for index, (option, _) in enumerate(pairs) if option is None]
    new_outputs = {positional[i] for i in WRITES_NEW.get(script, ()) if i < len(positional)}
    for index in new_outputs:
        output = pairs[index][1]
        if (REPO / output).exists():
            check.problems.append(f"{output} exists: {script} never overwrites, so this command would fail")
        elif problem := path_problem(str(Path(output).parent)):
            check.problems.append(problem)
    for option, value in pairs:
        if option in WRITES_INTO.get(script, ()) and (problem := path_problem(str(Path(value).parent))):
            check.problems.append(problem)
    _read_paths(check, pairs, skip=new_outputs | WRITES_INTO.get(script, set()))
    real = script in REAL_RUNS
    check.how = "run as written" if real else f"{script} --help"
    check.job = {"kind": "script", "argv": [script, *(rest if real else ["--help"])], "load": []}


# Running the jobs.

def _environment() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _reason(code: object, out: str, err: str) -> str:
    """The exit status and the line that says why: the last error line of stderr, else its last line."""
    lines = [line.strip() for line in err.splitlines() if line.strip()] or \
        [line.strip() for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return f"exit {code}: {((errors or lines or [''])[-1])[:400]}"


def run_process(job: dict, timeout: float) -> dict:
    """A job as its own process, from the checkout's root."""
    if job["kind"] == "entry":
        argv = [str(BIN / "cifar-lightning"), *job["argv"]]
    elif job["kind"] == "script":
        argv = [str(BIN / "python"), *job["argv"]]
    else:
        argv = job["argv"]
    for path in job.get("load", []):
        loaded = run_process({"kind": "process", "argv": [str(BIN / "python"), __file__, "--load", path]}, timeout)
        if loaded["code"] != 0:
            return loaded
    try:
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_environment())
    except subprocess.TimeoutExpired:
        return {"code": "timeout", "out": "", "err": f"no answer within {timeout:.0f} s"}
    except OSError as err:
        return {"code": "not run", "out": "", "err": str(err)}
    return {"code": result.returncode, "out": result.stdout, "err": result.stderr}


def run_in_one_process(jobs: list[dict], timeout: float) -> list[dict]:
    """The Python jobs one after another in one interpreter (``--worker``), which imports torch once."""
    with tempfile.TemporaryDirectory() as folder:
        request, answer = Path(folder) / "jobs.json", Path(folder) / "results.json"
        request.write_text(json.dumps(jobs))
        try:
            worker = subprocess.run([str(BIN / "python"), __file__, "--worker", str(request), str(answer)], cwd=REPO,
                                    capture_output=True, text=True, timeout=timeout, env=_environment())
        except subprocess.TimeoutExpired:
            return [{"code": "timeout", "out": "", "err": f"the worker did not finish within {timeout:.0f} s"}] * len(jobs)
        if not answer.is_file():
            failure = {"code": worker.returncode, "out": worker.stdout, "err": worker.stderr}
            return [failure] * len(jobs)
        return json.loads(answer.read_text())


def load_weights_only(path: str) -> str | None:
    """Why ``path`` is no checkpoint the CLI would load, or None."""
    import torch

    try:
        checkpoint = torch.load(REPO / path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every reason counts as a failure, reported
        return f"{path} does not load weights-only: {str(err).splitlines()[0]}"
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        return f"{path} has no state_dict"
    return None


def worker(request: Path, answer: Path) -> None:
    """Run each job of ``request`` as ``__main__`` in this interpreter; write their results to ``answer``."""
    import contextlib
    import io
    import runpy
    import traceback

    os.chdir(REPO)
    results, loaded = [], {}
    for job in json.loads(request.read_text()):
        out, err, code = io.StringIO(), io.StringIO(), 0
        problems = [loaded.setdefault(path, load_weights_only(path)) for path in job.get("load", [])]
        if any(problems):
            results.append({"code": "refused", "out": "", "err": next(filter(None, problems))})
            continue
        path = str(BIN / "cifar-lightning") if job["kind"] == "entry" else str(REPO / job["argv"][0])
        args = job["argv"] if job["kind"] == "entry" else job["argv"][1:]
        saved_argv, saved_path = sys.argv, list(sys.path)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                sys.argv = [path, *args]
                sys.path.insert(0, str(Path(path).parent))
                runpy.run_path(path, run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if isinstance(exit_.code, str):
                err.write(exit_.code)
        except BaseException:  # noqa: BLE001 - a crash is this command's failure, not the worker's
            code = 1
            err.write(traceback.format_exc())
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
        results.append({"code": code, "out": out.getvalue()[-20000:], "err": err.getvalue()[-20000:]})
    answer.write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md and docs/*.md)")
    parser.add_argument("--separate", action="store_true", help="run each command in its own process (slower)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for all the Python commands together")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.load:
        problem = load_weights_only(args.load)
        sys.exit(f"check_docs: {problem}" if problem else 0)
    if not (BIN / "cifar-lightning").is_file():
        sys.exit(f"check_docs: no cifar-lightning beside {sys.executable}. Fix: run it with the venv's python, "
                 f".venv/bin/python scripts/check_docs.py")

    files = [path.resolve() for path in args.files] or [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    checks = [plan(command) for path in files for command in extract(path)]
    if not checks:
        sys.exit("check_docs: no command found in " + ", ".join(str(path) for path in files))
    # Each distinct job once.
    jobs = list({json.dumps(c.job, sort_keys=True): c.job for c in checks if c.job and not c.problems}.values())
    python = [job for job in jobs if job["kind"] != "process"]
    others = [job for job in jobs if job["kind"] == "process"]
    with ThreadPoolExecutor(2) as pool:
        if args.separate:
            results = list(pool.map(lambda job: run_process(job, args.timeout), jobs))
        else:
            python_results = pool.submit(run_in_one_process, python, args.timeout)
            other_results = [run_process(job, 120) for job in others]
            results = python_results.result() + other_results
            jobs = python + others
    result_of = {json.dumps(job, sort_keys=True): result for job, result in zip(jobs, results)}

    failed = 0
    for check in checks:
        problems = list(check.problems)
        if check.job and not problems:
            result = result_of[json.dumps(check.job, sort_keys=True)]
            if result["code"] != 0:
                problems.append(_reason(result["code"], result["out"], result["err"]))
        failed += bool(problems)
        status = "FAILED" if problems else "ok"
        detail = "; ".join(problems) if problems else check.how
        print(f"{status:6}  {check.command.source}  {check.command.text}  [{detail}]")
    print(f"\n{len(checks)} commands, {len(checks) - failed} ok, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
