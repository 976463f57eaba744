"""Screenshots of the web UI for the README (``scripts/screenshots``): the main pages of a demo warehouse, as PNGs.

It fills a warehouse in a temporary folder with the real demo (the digits dataset, a sweep of six MLPs run by two
worker processes, their runs and models; few epochs), evaluates each final model on the test split and moves the
alias ``digits-mlp@champion`` from the weakest to the best of them (so the champion panel has a history and a
"improved from ... to ..." line), serves the UI on 127.0.0.1 with uvicorn in a thread, and has headless chromium
(Playwright) save each page at 1,280 px wide, after its charts are drawn: the runs page, a run page, the compare
view of three runs, the sweep view, the models page with the champion panel, the dataset page and the task board.

The sweep's seeds are fixed (the demo's grid has ``seed=0``), so the pictures change only when the UI does; ids
and times differ from one generation to the next. ``python -m mlwarehouse.testing.screenshots OUT`` writes
``OUT/<page>.png`` (default ``docs/images``).
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from mlwarehouse.testing.browser import launch, serve_ui
from mlwarehouse.testing.browser import missing as _missing

__all__ = ["PAGES", "WIDTH", "missing", "fill", "capture", "generate", "main"]

#: the pages saved, in the README's order (each becomes ``<name>.png``)
PAGES = ("runs", "run", "compare", "sweep", "models", "dataset", "tasks")
WIDTH, HEIGHT, TALLEST = 1280, 800, 1600
ALIAS = "champion"


def missing() -> str | None:
    """Why screenshots cannot be taken here (a module or chromium missing), or None."""
    return _missing(("playwright", "fastapi", "uvicorn", "sklearn", "torch", "PIL"))


# -- the warehouse -----------------------------------------------------------------------------------------------
def fill(home: str | Path, *, epochs: int = 4, workers: int = 2) -> dict:
    """Run the demo into ``home``, then evaluate its final models and crown a champion; returns what the pages
    show: ``project``, ``runs`` (ids, by n_hidden then lr), ``dataset`` (the digits id), ``champion``."""
    import torch

    from mlwarehouse.examples.demo import DATASET, PROJECT, TASK_NAME, load_digits_splits, run_demo
    from mlwarehouse.warehouse import connect
    summary = run_demo(home=str(home), workers=workers, epochs=epochs)
    if summary["failed"]:
        raise RuntimeError(f"{summary['failed']} of the demo's {summary['tasks']} tasks failed")
    wh = connect(home=str(home), project=PROJECT)
    try:
        p = wh.project(PROJECT)
        digits = p.datasets.find(DATASET)[0]
        X_test, y_test = load_digits_splits()[4:]
        scored = []
        for model in p.models.find(name=TASK_NAME):
            with torch.no_grad():
                accuracy = float((model.load()(torch.from_numpy(X_test)).argmax(1).numpy() == y_test).mean())
            p.models.evaluations.record(model, digits, "accuracy", accuracy, fold="test")
            scored.append((accuracy, model.id))
        scored.sort()
        aliases = p.models.aliases
        aliases.set(TASK_NAME, ALIAS, scored[0][1], by="screenshots", reason="the first model of the sweep")
        aliases.promote(TASK_NAME, ALIAS, scored[-1][1], evaluation=(digits, "accuracy"), fold="test",
                        by="screenshots", reason="best test accuracy of the sweep")
        runs = p.runs.find(sort=[("hyper_parameters.n_hidden", 1), ("hyper_parameters.lr", 1)])
        return {"project": PROJECT, "task": TASK_NAME, "runs": [r.id for r in runs], "dataset": digits.id,
                "champion": scored[-1][1]}
    finally:
        wh.close()


# -- the pictures ------------------------------------------------------------------------------------------------
def _save(page, path: Path) -> None:
    """The page from its top, at most TALLEST px high, written as an optimized PNG (a third of chromium's size)."""
    from PIL import Image
    height = min(TALLEST, int(page.evaluate("() => document.documentElement.scrollHeight")))
    raw = page.screenshot(full_page=True, clip={"x": 0, "y": 0, "width": WIDTH, "height": max(height, HEIGHT)})
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    image.save(path, format="PNG", optimize=True)


def _settle(page) -> None:
    page.wait_for_load_state("networkidle")
    page.evaluate("() => document.fonts.ready")


def capture(base: str, filled: dict, out: str | Path) -> dict[str, Path]:
    """Save every page of PAGES from the UI at ``base`` (a warehouse :func:`fill` made) into ``out``."""
    from playwright.sync_api import expect, sync_playwright
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    project, runs = filled["project"], filled["runs"]
    at = f"{base}/p/{project}"
    saved: dict[str, Path] = {}
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT}, device_scale_factor=1)
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            def shot(name: str) -> None:
                _settle(page)
                saved[name] = out / f"{name}.png"
                _save(page, saved[name])

            page.goto(f"{at}/runs")
            expect(page.locator("#runs tbody tr")).to_have_count(len(runs))
            shot("runs")

            page.goto(f"{at}/runs/{runs[-1]}")
            page.wait_for_selector("#charts .chart-card canvas")
            shot("run")

            page.goto(f"{at}/runs")
            for run in runs[1::2]:  # one learning rate, every width
                page.check(f'input.pick[value="{run}"]')
            page.click("#compare")
            expect(page.locator("#compare-status")).to_contain_text("runs:")
            page.wait_for_selector("#charts .chart-card canvas")
            shot("compare")

            page.goto(f"{at}/sweep?task={filled['task']}")
            page.wait_for_selector("#sweep[data-ready]")
            shot("sweep")

            page.goto(f"{at}/models")
            expect(page.locator(f'#aliases tbody tr[data-model="{filled["champion"]}"]')).to_have_count(1)
            shot("models")

            page.goto(f"{at}/datasets/{filled['dataset']}")
            page.wait_for_function("() => [...document.images].every((i) => i.complete && i.naturalWidth > 0)")
            shot("dataset")

            page.goto(f"{at}/tasks")
            expect(page.locator('#tasks tbody tr[data-status="finished"]')).to_have_count(len(runs))
            shot("tasks")
            context.close()
        finally:
            browser.close()
    if errors:
        raise RuntimeError(f"JavaScript errors on the pages: {errors}")
    return saved


def generate(out: str | Path = "docs/images", *, epochs: int = 4, workers: int = 2) -> dict[str, Path]:
    """Fill a demo warehouse in a temporary folder, serve it and save every page of PAGES into ``out``."""
    from mlwarehouse.warehouse import connect
    why = missing()
    if why:
        raise RuntimeError(f"cannot take screenshots: {why}")
    with tempfile.TemporaryDirectory(prefix="mlw-screenshots-") as tmp:
        home = Path(tmp) / "wh"
        filled = fill(home, epochs=epochs, workers=workers)
        wh = connect(home=str(home))
        base, stop = serve_ui(wh)
        try:
            return capture(base, filled, out)
        finally:
            stop()
            wh.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlwarehouse.testing.screenshots", description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="docs/images", help="folder for the PNGs (default docs/images)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per model of the demo's sweep (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the demo (default 2)")
    args = parser.parse_args(argv)
    for name, path in generate(args.out, epochs=args.epochs, workers=args.workers).items():
        print(f"{name:8} {path}  {path.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
