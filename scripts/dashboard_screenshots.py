"""What a person sees in TensorBoard: a real server over a log folder, read back and photographed.

Starts ``tensorboard`` on 127.0.0.1 over ``--logdir``, prints what each dashboard shows (read
through TensorBoard's HTTP API: the HPARAMS columns, the scalar tags, text entries and images per
run), and, where Debian's ``chromium`` is installed, screenshots each dashboard with headless
Chromium at 1600 px wide into ``--out``:

    .venv/bin/python scripts/dashboard_screenshots.py --logdir lightning_logs --out docs/dashboard

``tests/test_dashboard.py`` checks the same HTTP answers on a fresh run.
"""

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TENSORBOARD = Path(sys.executable).with_name("tensorboard")
DASHBOARDS = ("hparams", "scalars", "text", "images")
# Chromium as this machine's browser tests run it: no GPU, no sandbox (root), and no background
# networking, whose connections a closed network refuses.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(logdir: Path, runs: set[str], timeout: float = 90) -> Iterator[tuple[str, Callable[[str], object]]]:
    """A TensorBoard server on 127.0.0.1 over ``logdir``, once it serves the scalars of ``runs``:
    yields its base URL and ``get(path)`` (JSON for the plugins' data routes, else bytes)."""
    port = _free_port()
    server = subprocess.Popen([str(TENSORBOARD), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
                               "--load_fast", "false", "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> object:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            body = response.read()
        return json.loads(body) if path.startswith("/data/plugin") and "individual" not in path else body

    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if runs <= set(get("/data/plugin/scalars/tags")):
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tensorboard did not serve the runs {sorted(runs)} of {logdir} within {timeout} s")
            time.sleep(0.5)
        yield base, get
    finally:
        server.terminate()
        server.wait(timeout=30)


def hparams_request(route: str, **request) -> str:
    """The GET path of an HPARAMS data route (the plugin takes its request as JSON)."""
    return f"/data/plugin/hparams/{route}?" + urllib.parse.urlencode(
        {"request": json.dumps({"experimentName": ""} | request)})


def describe(get: Callable[[str], object]) -> str:
    """What each dashboard shows, as a person would count it."""
    experiment = get(hparams_request("experiment"))
    hparams = [info.get("displayName") or info["name"] for info in experiment.get("hparamInfos", [])]
    metrics = [info.get("displayName") or info["name"]["tag"] for info in experiment.get("metricInfos", [])]
    lines = [f"HPARAMS: columns shown by default {hparams[:5]} and {metrics[:5]}; "
             f"{len(hparams)} hyperparameters and {len(metrics)} metrics in all"]
    for plugin in ("scalars", "text", "images"):
        for run, tags in sorted(get(f"/data/plugin/{plugin}/tags").items()):
            lines.append(f"{plugin}: run {run}: {len(tags)} tags: {', '.join(sorted(tags))}")
    return "\n".join(lines)


def screenshot(chromium: str, url: str, path: Path, width: int, height: int) -> None:
    """``url`` rendered by headless Chromium into the PNG ``path``, after its scripts have fetched the data."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        "--virtual-time-budget=20000", f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=180)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", type=Path, default=Path("lightning_logs"))
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard"))
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args()
    runs = {path.parent.relative_to(args.logdir).as_posix() for path in args.logdir.rglob("events.out.tfevents.*")}
    if not runs:
        sys.exit(f"dashboard_screenshots: no TensorBoard event files under {args.logdir}. Fix: pass the log folder of "
                 f"a run, e.g. --logdir lightning_logs")
    with serve(args.logdir, runs) as (base, get):
        print(describe(get))
        chromium = shutil.which("chromium")
        if chromium is None:
            print("no screenshots: Chromium is not installed (Debian: apt-get install chromium)")
            return
        args.out.mkdir(parents=True, exist_ok=True)
        for dashboard in DASHBOARDS:
            path = args.out / f"{dashboard}.png"
            screenshot(chromium, f"{base}/#{dashboard}", path, args.width, args.height)
            print(f"screenshot: {path}")


if __name__ == "__main__":
    main()
