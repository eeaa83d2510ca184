"""Stage 4: a study's report: report.html with PNGs beside it, logged to MLflow.

    python -m raypd.report --study NAME [--root runs] [--address ADDR]

Pictures: validation-loss curves of every trial (ASHA-stopped trials end early), true vs
predicted per target for the best model on the test split (with R²), true vs re-simulated
series of a few test samples (the ODE solved from the predicted parameters and initial
conditions: the notebook's "real test"), parallel coordinates and a contour of the search
space against the validation loss, the test split refined through the ODE (raypd.refine:
model-only and refined MSE, share identified, coverage of both kinds of interval, clean and
with 2% noise, and a picture of intervals against truth), and a table of trials. The best
model's re-simulation error and the refined figures go into summary.json, and the refined
figures into the best trial's MLflow run as metrics.
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import numpy as np

from raypd.cli import ArgumentParser, check_writable, run_main
from raypd.dataio import write_json
from raypd.tracking import log_report


def _figures():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


# Pictures are drawn at DPI and shown at their own size: report.html's body is 1100 px wide, so
# every figure is at most WIDTH inches wide (never scaled down, its 10-point text stays legible).
DPI = 100
WIDTH = 10.8


def _number(value: float, digits: int | None = None) -> str:
    """A number as people write it: 0.002, 1.16, 250 (1e-5 below 1e-4 or from 1e6 on). digits:
    that many significant digits (1.00, 0.00370), else the fewest that give the value back (a
    tick's: 0.0015, 2)."""
    import math

    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    for p in [digits] if digits else range(1, 8):
        if 1e-4 <= abs(value) < 1e6:  # with digits, 1.002 is 1.00 (not 1) and 32 is 32
            trim = "k" if digits and value != round(value) else "-"
            text = np.format_float_positional(value, precision=p, unique=False, fractional=False, trim=trim)
        else:
            mantissa, exponent = f"{value:.{p - 1}e}".split("e")
            text = f"{mantissa}e{int(exponent)}"
        if digits or math.isclose(float(text), value, rel_tol=1e-6):
            break
    return text


def _plain_log_axis(axis) -> None:
    """Plain tick labels on a log-scale axis (0.5, 1, 2 or 1.02, 1.04: never 1.16x10^0). Minor
    ticks are labelled as matplotlib's LogFormatter chooses (all of them when the axis spans
    under 0.4 decade, 2, 3, 4 and 6 under a decade, none beyond); an axis under a decade with
    fewer than four of them gets evenly spaced ticks instead (0.0015, 0.002, 0.0025), all
    labelled, with the same number of decimals (1.00, 1.02, 1.10: not 1, 1.02, 1.1)."""
    from matplotlib.ticker import LogFormatter, LogLocator, MaxNLocator

    def decimals(text: str) -> int:
        return len(text.partition(".")[2]) if "e" not in text else 0

    def whole(tick: float) -> bool:  # a whole multiple of a power of 10 (LogLocator's ticks)
        coefficient = tick / 10 ** np.floor(np.log10(tick))
        return bool(np.isclose(coefficient, np.round(coefficient), rtol=1e-6))

    class PlainLogFormatter(LogFormatter):
        def set_locs(self, locs=None):
            super().set_locs(locs)
            if locs is not None and any(t > 0 and not whole(t) for t in locs):
                self._sublabels = None  # evenly spaced ticks: label them all

        def _num_to_string(self, x, vmin, vmax):
            text = _number(x)
            if vmax >= 10 * vmin or "e" in text:
                return text
            ticks = np.concatenate([self.axis.get_majorticklocs(), self.axis.get_minorticklocs()])
            places = max([decimals(_number(t)) for t in ticks if vmin <= t <= vmax] + [decimals(text)])
            return f"{x:.{places}f}"

    class FewLogTicks(LogLocator):
        def tick_values(self, vmin, vmax):
            ticks = super().tick_values(vmin, vmax)
            lo, hi = sorted((vmin, vmax))
            if 0 < lo and hi < 10 * lo and ((ticks >= lo) & (ticks <= hi)).sum() < 4:
                return MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
            return ticks

    axis.set_minor_locator(FewLogTicks(10.0, subs="auto"))
    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter())


def curves(summary: dict, study_dir: Path, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    from raypd.train import read_state

    plt = _figures()
    fig, ax = plt.subplots(figsize=(WIDTH, 5), layout="constrained")
    colours = plt.cm.tab10.colors if len(summary["trials"]) <= 10 else plt.cm.tab20.colors
    for colour, trial in zip(colours * (len(summary["trials"]) // len(colours) + 1), summary["trials"]):
        last = study_dir / "trials" / trial["trial_id"] / "checkpoints" / "last"
        if not (last / "state.pt").exists():
            continue
        history = read_state(last)["history"]
        best = trial["trial_id"] == summary["best_trial_id"]
        # markers: a trial ASHA stopped after its first epoch is one point, not an invisible line
        ax.plot([h["epoch"] for h in history], [h["val_loss"] for h in history], color=colour,
                lw=2.5 if best else 1.2, marker="o", ms=5 if best else 3.5, zorder=3 if best else 2,
                label=f"{trial['trial_id']}{' (best)' if best else ''}")
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    ax.grid(which="both", alpha=0.25)
    ax.set(xlabel="epoch", ylabel="validation loss (standardised targets, log scale)",
           title=f"{summary['study']}: validation loss per trial")
    if ax.get_legend_handles_labels()[0]:
        fig.legend(title="trial", fontsize=9, loc="outside right upper")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def true_vs_predicted(names: list[str], y_true: np.ndarray, y_pred: np.ndarray, metrics: dict, path: Path) -> None:
    plt = _figures()
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, 3.4 * rows), squeeze=False, layout="constrained")
    for ax, (i, name) in zip(axes.ravel(), enumerate(names)):
        r2 = metrics["per_target"][name]["r2"]
        ax.scatter(y_true[:, i], y_pred[:, i], s=8, alpha=0.5, linewidths=0)
        lo, hi = min(y_true[:, i].min(), y_pred[:, i].min()), max(y_true[:, i].max(), y_pred[:, i].max())
        pad = 0.05 * (hi - lo) or 0.05 * max(abs(lo), 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1)
        # the same range on both axes: the diagonal at 45 degrees, misses read as distances
        ax.set(xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad), xlabel="true", ylabel="predicted",
               title=f"{name}: R² {r2:.3f}" if r2 is not None else f"{name}: constant (no R²)")
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def resimulated(times: np.ndarray, true: np.ndarray, resim: np.ndarray, ids: np.ndarray, channels: list[str],
                path: Path) -> None:
    from matplotlib.lines import Line2D

    plt = _figures()
    fig, axes = plt.subplots(len(ids), 1, figsize=(WIDTH, 0.5 + 2.4 * len(ids)), squeeze=False, sharex=True,
                             layout="constrained")
    colours = plt.cm.tab10.colors
    for ax, s_true, s_resim, sample in zip(axes[:, 0], true, resim, ids):
        for c in range(len(channels)):
            colour = colours[c % len(colours)]
            ax.plot(times, s_true[c], lw=1.5, color=colour)
            ax.plot(times, s_resim[c], "--", color=colour, lw=1.5)
        diverged = " (re-simulation diverged)" if np.isnan(s_resim).any() else ""
        ax.set_title(f"test sample {sample}{diverged}", fontsize=10)
        ax.grid(alpha=0.25)
    axes[-1, 0].set_xlabel("t")
    # one legend for all panels: colour is the channel, the line style true or re-simulated
    handles = [Line2D([], [], color=colours[c % len(colours)], lw=2, label=name) for c, name in enumerate(channels)]
    handles += [Line2D([], [], color="k", lw=1.5, label="true"), Line2D([], [], color="k", ls="--", lw=1.5,
                                                                        label="re-simulated")]
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _space_columns(done: list[dict], space: dict | None) -> list[dict]:
    """Per sampled key: its values (raw), where they sit on a plot axis (pos: log10 for a
    loguniform key, the level's index for a non-numeric choice), the scale and the levels."""
    space = space or {}
    columns = []
    for key in sorted({k for t in done for k in t["config"]}):
        values = [t["config"].get(key) for t in done]
        kind = next(iter(space.get(key) or {}), None)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raw = np.array(values, dtype=float)
            log = (kind == "loguniform" if kind else key.endswith("lr")) and bool((raw > 0).all())
            columns.append({"name": key, "raw": raw, "pos": np.log10(raw) if log else raw,
                            "scale": "log" if log else "linear", "levels": None})
        else:
            order = [json.dumps(v) for v in space[key]["choice"]] if kind == "choice" else []
            present = {json.dumps(v) for v in values}
            levels = [v for v in order if v in present] + sorted(present - set(order))
            columns.append({"name": key, "raw": None, "pos": np.array([levels.index(json.dumps(v)) for v in values],
                                                                      dtype=float),
                            "scale": "category", "levels": [_level(v) for v in levels]})
    return columns


def _level(dumped: str) -> str:
    value = json.loads(dumped)
    return value if isinstance(value, str) else dumped


def _value_axis(ax, which: str, column: dict) -> None:
    """An axis of the contour picture in the column's own terms: lr on a log scale with plain
    labels, a choice's levels by name, few distinct numbers (a batch size) at those numbers."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    if column["scale"] == "log":
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
        _plain_log_axis(axis)
    elif column["scale"] == "category":
        axis.set_ticks(range(len(column["levels"])), column["levels"])
    else:
        distinct = np.unique(column["raw"])
        if len(distinct) <= 6:
            axis.set_ticks(distinct, [_number(v) for v in distinct])
    # room around the points (tricontourf leaves none: the edge points were cut in half)
    lo, hi = float(column["pos"].min()), float(column["pos"].max())
    pad = 0.08 * (hi - lo) or 0.5
    limits = (lo - pad, hi + pad)
    if column["scale"] == "log":
        limits = (10 ** limits[0], 10 ** limits[1])
    (ax.set_xlim if which == "x" else ax.set_ylim)(limits)
    (ax.set_xlabel if which == "x" else ax.set_ylabel)(column["name"] + (" (log scale)" if column["scale"] == "log"
                                                                         else ""))


def space_plots(summary: dict, parallel_path: Path, contour_path: Path, space: dict | None = None) -> None:
    """Parallel coordinates of the sampled values and a contour (or scatter) of val_loss over
    the first two of them. space: the study's search space (search.space), for which keys are
    loguniform (drawn on a log scale; without it, keys ending in lr) and the order of choices."""
    import matplotlib.colors
    import matplotlib.tri

    plt = _figures()
    done = [t for t in summary["trials"] if t["val_loss"] is not None]
    loss = np.array([t["val_loss"] for t in done])
    best = int(np.argmin(loss))
    norm = matplotlib.colors.Normalize(loss.min(), loss.max() if np.ptp(loss) else loss.min() + 1e-9)
    cmap = plt.cm.viridis
    params = _space_columns(done, space)
    columns = params + [{"name": "val_loss", "raw": loss, "pos": loss, "scale": "linear", "levels": None}]

    # parallel coordinates: one vertical axis per column, its range written at its ends (its
    # levels beside it for a choice), the column names below, val_loss by colour (dark = low)
    n = len(columns)
    fig, ax = plt.subplots(figsize=(min(WIDTH, max(6.4, 2.5 + 1.9 * n)), 4.8), layout="constrained")
    scaled = np.stack([(c["pos"] - c["pos"].min()) / (np.ptp(c["pos"]) or 1.0) if np.ptp(c["pos"])
                       else np.full(len(done), 0.5) for c in columns], axis=1)
    for row in np.argsort(-loss):  # the best drawn last, on top
        ax.plot(range(n), scaled[row], color=cmap(norm(loss[row])), lw=2.5 if row == best else 1.5,
                alpha=0.9, zorder=3 if row == best else 2, marker="o" if n == 1 else None)  # 1 column: points
    label = {"fontsize": 9, "ha": "center", "textcoords": "offset points"}
    for x, column in enumerate(columns):
        ax.plot([x, x], [0, 1], color="0.4", lw=1, zorder=1)  # ends where its range is written
        if column["scale"] == "category":
            for level, name in enumerate(column["levels"]):
                y = level / (len(column["levels"]) - 1) if len(column["levels"]) > 1 else 0.5
                ax.annotate(name, (x, y), xytext=(-5, 0), fontsize=9, ha="right", va="center",
                            textcoords="offset points", zorder=4,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
        elif np.ptp(column["pos"]):
            ax.annotate(_number(column["raw"].max(), 3), (x, 1), xytext=(0, 4), va="bottom", **label)
            ax.annotate(_number(column["raw"].min(), 3), (x, 0), xytext=(0, -4), va="top", **label)
        else:
            ax.annotate(_number(column["raw"][0], 3), (x, 0.5), xytext=(0, 4), va="bottom", **label)
    names = [c["name"] + (" (log)" if c["scale"] == "log" else "") for c in columns]
    turned = n > 5 or max(len(name) for name in names) > 16
    ax.set_xticks(range(n), names, fontsize=10, rotation=20 if turned else 0, ha="right" if turned else "center")
    ax.tick_params(axis="x", length=0, pad=6)
    left = 0.4 if columns[0]["scale"] == "category" else 0.15  # room for a choice's level names
    ax.set(xlim=(-left, n - 0.85), ylim=(-0.12, 1.12), yticks=[])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title("parallel coordinates of the trials (colour: val_loss, dark = low)", pad=10)
    fig.colorbar(plt.cm.ScalarMappable(norm, cmap), ax=ax, label="val_loss", pad=0.02, aspect=30)
    fig.savefig(parallel_path, dpi=DPI)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5.2), layout="constrained")
    trial = {"name": "trial", "raw": np.arange(len(done), dtype=float), "pos": np.arange(len(done), dtype=float),
             "scale": "linear", "levels": None}
    x, *rest = params or [trial]
    if rest:
        y = rest[0]
        drawn = None
        if len(done) >= 4 and np.ptp(x["pos"]) > 0 and np.ptp(y["pos"]) > 0 and "category" not in (
                x["scale"], y["scale"]):
            try:
                # triangles made where the points sit on the page (log10 for a log scale), so
                # the surface is that of the picture
                corners = matplotlib.tri.Triangulation(x["pos"] / np.ptp(x["pos"]), y["pos"] / np.ptp(y["pos"]))
                mesh = matplotlib.tri.Triangulation(x["raw"], y["raw"], corners.triangles)
                drawn = ax.tricontourf(mesh, loss, levels=12, cmap=cmap, norm=norm, alpha=0.85)
            except (ValueError, RuntimeError):  # collinear points: no triangulation
                drawn = None
        xs = x["raw"] if x["scale"] != "category" else x["pos"]
        ys = y["raw"] if y["scale"] != "category" else y["pos"]
        points = ax.scatter(xs, ys, c=loss, cmap=cmap, norm=norm, s=45, edgecolor="k", zorder=3, clip_on=False)
        ax.scatter(xs[best], ys[best], marker="*", s=260, c=[cmap(norm(loss[best]))], edgecolor="red", lw=1.2,
                   zorder=4, clip_on=False, label=f"best ({_number(loss[best], 4)})")
        _value_axis(ax, "x", x)
        _value_axis(ax, "y", y)
        fig.colorbar(points if drawn is None else drawn, ax=ax, label="val_loss")
    else:
        xs = x["raw"] if x["scale"] != "category" else x["pos"]
        ax.scatter(xs, loss, c=loss, cmap=cmap, norm=norm, s=45, edgecolor="k", zorder=3)
        ax.scatter(xs[best], loss[best], marker="*", s=260, c=[cmap(norm(loss[best]))], edgecolor="red", lw=1.2,
                   zorder=4, label=f"best ({_number(loss[best], 4)})")
        _value_axis(ax, "x", x)
        ax.set_ylabel("val_loss")
        ax.grid(which="both", alpha=0.25)
    fig.legend(loc="outside lower center", fontsize=9)  # not over the points
    ax.set_title("val_loss over the search space")
    fig.savefig(contour_path, dpi=DPI)
    plt.close(fig)


def make_report(study: str, root: str | Path = "runs", samples_shown: int = 4, address: str | None = None) -> Path:
    """From the study folder alone: the best checkpoint (with its saved normalisation) and the
    test split saved beside the summary; ROOT/data is not read."""
    from raypd.lock import hold
    from raypd.predict import load_best
    from raypd.tune import LOCK_FILE

    from raypd.serve import SavedModel

    root = Path(root)
    # a study that is not there, not finished or damaged stops here, before the lock is taken
    # (a refused report changes nothing in the folder)
    SavedModel.load(load_best(study, root)[2])
    study_dir = root / "tune" / study
    check_writable(study_dir, "--root")
    # the study's one writer while the report writes into its folder (summary.json, pictures,
    # the refined calibration): not beside a study run, or another report, of it
    with hold(study_dir / LOCK_FILE, f"study {study} in {study_dir}"):
        return _make_report(study, root, samples_shown, address)


def _make_report(study: str, root: Path, samples_shown: int, address: str | None) -> Path:
    from raypd import ode
    from raypd.intervals import metrics as test_metrics
    from raypd.predict import load_best, resimulate
    from raypd.serve import TEST_SPLIT_FILE, SavedModel, iter_test_split, read_test_split
    from raypd.tune import SUMMARY_FILE

    config, summary, checkpoint = load_best(study, root)
    study_dir = root / "tune" / study
    model = SavedModel.load(checkpoint)
    times = np.asarray(model.meta["time_points"])
    # the test split a chunk at a time (memory holds one chunk, whatever its size): estimates,
    # re-simulations, and the first samples_shown series kept for the picture
    test_ids, y_true, y_pred, shown = [], [], [], []
    squared, entries, diverged = 0.0, 0, 0
    for ids, targets, series in iter_test_split(study_dir / TEST_SPLIT_FILE, model.series_shape):
        estimate = model.predict(series)
        resim = resimulate(estimate, times, config.data.n_actions)
        ok = ~np.isnan(resim).any(axis=(1, 2))
        squared += float(((resim[ok] - series[ok]) ** 2).sum())
        entries, diverged = entries + resim[ok].size, diverged + int((~ok).sum())
        test_ids.append(ids), y_true.append(targets), y_pred.append(estimate)
        if sum(len(s[0]) for s in shown) < samples_shown:
            shown.append((ids[:samples_shown], series[:samples_shown], resim[:samples_shown]))
    test_ids, y_true, y_pred = (np.concatenate(parts) for parts in (test_ids, y_true, y_pred))
    summary["resimulation_mse"] = squared / entries if entries else None
    summary["resimulation_diverged"] = diverged

    pictures = {
        "curves.png": "Validation loss of every trial",
        "intervals.png": "Test series: truth, the model's estimate and the refined one, with their 90% intervals",
        "true_vs_predicted.png": "Best model on the test split: true vs predicted, per target",
        "resimulated.png": "True vs re-simulated series (ODE solved from the predicted parameters and initial conditions)",
        "parallel_coordinates.png": "The search space: parallel coordinates",
        "contour.png": "The search space: validation loss",
    }
    metrics = test_metrics(y_true, y_pred, model.target_names)
    if model.calibration is None:  # a study of an older raypd: no intervals to refine with
        print(f"raypd.report: {checkpoint} has no interval calibration (an older raypd ran the study): the test "
              "split is not refined", file=sys.stderr)
        summary["refined"] = None
        del pictures["intervals.png"]
    else:
        # the first REFINED_TEST series of the test split (refinement takes ~10-250 ms a series)
        ids, targets, series = read_test_split(study_dir / TEST_SPLIT_FILE, model.series_shape, limit=REFINED_TEST)
        summary["refined"] = refined_test(config, summary, study_dir, model, series, targets, ids, times,
                                          address=address)
    curves(summary, study_dir, study_dir / "curves.png")
    true_vs_predicted(model.target_names, y_true, y_pred, metrics, study_dir / "true_vs_predicted.png")
    shown_ids, shown_series, shown_resim = (np.concatenate(parts)[:samples_shown] for parts in zip(*shown))
    resimulated(times, shown_series, shown_resim, shown_ids, ode.channel_names(config.data.n_actions),
                study_dir / "resimulated.png")
    space_plots(summary, study_dir / "parallel_coordinates.png", study_dir / "contour.png", config.search.space)
    if summary["refined"] is not None:
        interval_plot(model.target_names, y_true, summary["refined"]["shown"], study_dir / "intervals.png")

    def number(value, fmt):
        return "" if value is None else format(value, fmt)

    rows = "".join(
        f"<tr><td>{html.escape(t['trial_id'])}</td><td>{t['status']}</td><td>{t['epochs']}</td>"
        f"<td>{number(t['val_loss'], '.4f')}</td><td><code>{html.escape(json.dumps(t['config']))}</code></td></tr>"
        for t in sorted(summary["trials"], key=lambda t: (t["val_loss"] is None, t["val_loss"] or 0)))
    per_target = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{m['mse']:.4g}</td><td>{m['mae']:.4g}</td>"
        f"<td>{number(m['r2'], '.3f') or 'constant'}</td></tr>"
        for name, m in metrics["per_target"].items())
    resim_text = (f"{summary['resimulation_mse']:.4g}" if summary["resimulation_mse"] is not None else "n/a")
    refined = summary["refined"]
    refined_rows = "" if refined is None else "".join(
        f"<tr><td>{html.escape(kind)}</td><td>{r['model_mse']:.4g}</td><td>{r['refined_mse']:.4g}</td>"
        f"<td>{r['identified']:.1%}</td><td>{r['coverage_model']['all']:.1%}</td>"
        f"<td>{r['coverage_refined']['all']:.1%}</td></tr>"
        for kind, r in ((k, refined[k]) for k in ("clean", "noise_2pct")))
    coverage_rows = "" if refined is None else "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(
            f"<td>{number(summary['refined'][k][c]['per_target'][name], '.1%')}</td>"
            for k in ("clean", "noise_2pct") for c in ("coverage_model", "coverage_refined")) + "</tr>"
        for name in model.target_names)
    images = "".join(f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>"
                     for name, title in pictures.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>raypd study {html.escape(study)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} img{{max-width:100%}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}</style></head><body>
<h1>Study {html.escape(study)}</h1>
<p>{summary['num_trials']} trials, {summary['total_epochs']} epochs; searcher {summary['searcher']}, scheduler
{summary['scheduler']}. Best trial {html.escape(str(summary['best_trial_id']))}: val_loss {summary['best_val_loss']:.4f},
test MSE {metrics['mse']:.4f} (raw units), R² {number(metrics['r2'], '.3f') or 'n/a'}; re-simulation MSE over the test split {resim_text}
({summary['resimulation_diverged']} of {len(test_ids)} re-simulations diverged).</p>
<h2>Best model, per target (test split, raw units)</h2>
<table><tr><th>target</th><th>MSE</th><th>MAE</th><th>R²</th></tr>{per_target}</table>
{refined_section(refined, refined_rows, coverage_rows)}
{images}
<h2>Trials</h2><table><tr><th>trial</th><th>status</th><th>epochs</th><th>best val_loss</th><th>config</th></tr>{rows}</table>
</body></html>"""
    write_json(study_dir / SUMMARY_FILE, summary)  # last: a report that fails leaves the summary as it was
    report = study_dir / "report.html"
    report.write_text(page)
    log_report(root, study, summary, [study_dir / name for name in pictures] + [report])
    return report


SHOWN = 30  # test series in the intervals picture
REFINED_TEST = 2000  # test series the report refines (the first, by sample_id)


def refined_section(refined: dict | None, refined_rows: str, coverage_rows: str) -> str:
    if refined is None:
        return ("<h2>Refined through the ODE</h2><p>Not refined: the best model has no interval calibration "
                "(an older raypd ran the study; re-run it with this raypd).</p>")
    return f"""<h2>Refined through the ODE (test split, raw units; {refined['level']:.0%} intervals)</h2>
<p>Each of the first {refined.get('series', 'all')} test series fitted by least squares through the ODE from the model's estimate (raypd.refine); identified:
fitted to its noise level with every free target determined. 2% noise: Gaussian, 2% of each channel's std.</p>
<table><tr><th>series</th><th>model MSE</th><th>refined MSE</th><th>identified</th><th>coverage, model-only</th>
<th>coverage, refined</th></tr>{refined_rows}</table>
<h3>Coverage per target</h3>
<table><tr><th>target</th><th>clean, model-only</th><th>clean, refined</th><th>2% noise, model-only</th>
<th>2% noise, refined</th></tr>{coverage_rows}</table>"""


def refined_test(config, summary: dict, study_dir: Path, model, series: np.ndarray, y_true: np.ndarray,
                 test_ids: np.ndarray, times: np.ndarray, level: float | None = None, address: str | None = None) -> dict:
    """The test split refined through the ODE, clean and with 2% observation noise: model-only
    and refined MSE, the identified share and each kind of interval's coverage (per target);
    plus, under "shown", the first SHOWN series' estimates and intervals for the picture."""
    from raypd.intervals import metrics as test_metrics
    from raypd.intervals import DEFAULT_LEVEL, add_noise, coverage
    from raypd.predict import next_best_models, refined_calibration
    from raypd.refine import FitProblem, refine_with_intervals

    level = DEFAULT_LEVEL if level is None else level
    problem = FitProblem.from_data_config(config.data, times)
    calibration = refined_calibration(study_dir, model, problem, address, prog="raypd.report", locked=True)
    models = [model] + next_best_models(summary, study_dir)
    names = model.target_names
    out: dict = {"level": level, "calibration_identified": calibration.get("identified"), "series": len(test_ids)}
    rng = np.random.default_rng(2024)
    for kind, noise in (("clean", 0.0), ("noise_2pct", 0.02)):
        observed = add_noise(series, noise, rng)
        fitted = refine_with_intervals(models, observed, problem, calibration, level, seeds=test_ids,
                                       address=address)
        refined_metrics = test_metrics(y_true, fitted["estimate"], names)
        out[kind] = {"model_mse": float(((fitted["model_estimate"] - y_true) ** 2).mean()),
                     "refined_mse": refined_metrics["mse"], "refined_metrics": refined_metrics,
                     "identified": float(fitted["identified"].mean()),
                     "starts": float(fitted["starts"].mean()),
                     "coverage_model": coverage(fitted["model_lower"], fitted["model_upper"], y_true, names),
                     "coverage_refined": coverage(fitted["lower"], fitted["upper"], y_true, names)}
        if kind == "clean":
            shown = slice(0, SHOWN)
            out["shown"] = {key: fitted[key][shown].tolist() for key in
                            ("model_estimate", "model_lower", "model_upper", "estimate", "lower", "upper")}
    return out


def interval_plot(names: list[str], y_true: np.ndarray, shown: dict, path: Path) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plt = _figures()
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, 0.4 + 3.1 * rows), squeeze=False, layout="constrained")
    count = len(shown["estimate"])
    x = np.arange(count)
    kinds = ((-0.2, "model_", "tab:orange", "o", "model estimate, 90% interval"),
             (0.2, "", "tab:blue", "s", "refined estimate, 90% interval"))
    for ax, (j, name) in zip(axes.ravel(), enumerate(names)):
        # truth first, underneath: a refined estimate on the truth stays in sight
        ax.plot(x, y_true[:count, j], "_", color="k", ms=7, mew=2, zorder=2)
        # intervals as bars (an unidentified series' refined estimate may lie outside the
        # model-only interval it keeps)
        for offset, prefix, colour, marker, _ in kinds:
            estimate = np.array(shown[f"{prefix}estimate"])[:, j]
            ax.vlines(x + offset, np.array(shown[f"{prefix}lower"])[:, j], np.array(shown[f"{prefix}upper"])[:, j],
                      color=colour, lw=1.2, zorder=3)
            ax.plot(x + offset, estimate, marker, ms=3.5, color=colour, zorder=4)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("test series")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colour, marker=marker, ms=5, lw=1.2, label=label)
               for _, _, colour, marker, label in kinds]
    handles.append(Line2D([], [], color="k", marker="_", ms=9, mew=2, ls="none", label="truth"))
    fig.legend(handles=handles, loc="outside upper center", ncol=3, fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m raypd.report", description="Write a study's report.html with pictures.")
    p.add_argument("--study", required=True, help="the study to report on")
    p.add_argument("--root", default="runs", help="the study's root (default %(default)s)")
    p.add_argument("--address", help="Ray cluster for refining the test split (default $RAY_ADDRESS, else a new "
                                     "local Ray)")
    args = p.parse_args(argv)

    def body() -> int:
        print(make_report(args.study, args.root, address=args.address))
        return 0

    run_main("raypd.report", body)


if __name__ == "__main__":
    main()
