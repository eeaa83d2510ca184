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
from raypd.dataset import write_json


def _figures():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def curves(summary: dict, study_dir: Path, path: Path) -> None:
    from raypd.train import read_state

    plt = _figures()
    fig, ax = plt.subplots(figsize=(8, 5))
    for trial in summary["trials"]:
        last = study_dir / "trials" / trial["trial_id"] / "checkpoints" / "last"
        if not (last / "state.pt").exists():
            continue
        history = read_state(last)["history"]
        best = trial["trial_id"] == summary["best_trial_id"]
        ax.plot([h["epoch"] for h in history], [h["val_loss"] for h in history], lw=2.5 if best else 1,
                label=f"{trial['trial_id']}{' (best)' if best else ''}")
    ax.set(xlabel="epoch", ylabel="validation loss (standardised targets)", yscale="log",
           title=f"{summary['study']}: validation loss per trial")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def true_vs_predicted(names: list[str], y_true: np.ndarray, y_pred: np.ndarray, metrics: dict, path: Path) -> None:
    plt = _figures()
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax, (i, name) in zip(axes.ravel(), enumerate(names)):
        r2 = metrics["per_target"][name]["r2"]
        ax.scatter(y_true[:, i], y_pred[:, i], s=4, alpha=0.5)
        lo, hi = min(y_true[:, i].min(), y_pred[:, i].min()), max(y_true[:, i].max(), y_pred[:, i].max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(title=f"{name}: R² {r2:.3f}" if r2 is not None else f"{name}: constant", xlabel="true",
               ylabel="predicted")
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def resimulated(times: np.ndarray, true: np.ndarray, resim: np.ndarray, ids: np.ndarray, channels: list[str],
                path: Path) -> None:
    plt = _figures()
    fig, axes = plt.subplots(len(ids), 1, figsize=(9, 2.6 * len(ids)), squeeze=False)
    for ax, s_true, s_resim, sample in zip(axes[:, 0], true, resim, ids):
        for c, name in enumerate(channels):
            line, = ax.plot(times, s_true[c], lw=1.5, label=f"{name} true")
            ax.plot(times, s_resim[c], "--", color=line.get_color(), lw=1.5, label=f"{name} re-simulated")
        diverged = " (re-simulation diverged)" if np.isnan(s_resim).any() else ""
        ax.set(title=f"test sample {sample}{diverged}", xlabel="t")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def space_plots(summary: dict, parallel_path: Path, contour_path: Path) -> None:
    """Parallel coordinates of the sampled values and a contour (or scatter) of val_loss over
    the first two of them."""
    plt = _figures()
    done = [t for t in summary["trials"] if t["val_loss"] is not None]
    keys = sorted({k for t in done for k in t["config"]})
    loss = np.array([t["val_loss"] for t in done])

    def column(key):
        values = [t["config"].get(key) for t in done]
        if all(isinstance(v, (int, float)) for v in values):
            v = np.array(values, dtype=float)
            return np.log10(v) if key.endswith("lr") and (v > 0).all() else v, key + (" (log10)" if key.endswith("lr") else "")
        levels = sorted({json.dumps(v) for v in values})
        return np.array([levels.index(json.dumps(v)) for v in values], dtype=float), key

    columns = [column(k) for k in keys] + [(loss, "val_loss")]
    fig, ax = plt.subplots(figsize=(max(5, 2.2 * len(columns)), 4.5))
    scaled = np.stack([(c - c.min()) / (np.ptp(c) or 1.0) for c, _ in columns], axis=1)
    colours = plt.cm.viridis((loss - loss.min()) / (np.ptp(loss) or 1.0))
    for row, colour in zip(scaled, colours):
        ax.plot(range(len(columns)), row, color=colour, lw=1.5, alpha=0.8)
    for x, (values, _) in enumerate(columns):
        ax.text(x, -0.08, f"{values.min():.3g}", ha="center", fontsize=7)
        ax.text(x, 1.04, f"{values.max():.3g}", ha="center", fontsize=7)
    ax.set_xticks(range(len(columns)), [name for _, name in columns], fontsize=8)
    ax.set(yticks=[], title="parallel coordinates (colour: val_loss, dark = low)")
    fig.tight_layout()
    fig.savefig(parallel_path, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    (x, x_name), *rest = columns[:-1] or [(np.arange(len(done), dtype=float), "trial")]
    if rest:
        y, y_name = rest[0]
        if len(done) >= 4 and np.ptp(x) > 0 and np.ptp(y) > 0:
            try:
                filled = ax.tricontourf(x, y, loss, levels=12, cmap="viridis")
                fig.colorbar(filled, ax=ax, label="val_loss")
            except (ValueError, RuntimeError):  # collinear points: no triangulation
                pass
        ax.scatter(x, y, c=loss, cmap="viridis", edgecolor="k")
        ax.set(xlabel=x_name, ylabel=y_name)
    else:
        ax.scatter(x, loss, c=loss, cmap="viridis", edgecolor="k")
        ax.set(xlabel=x_name, ylabel="val_loss")
    ax.set_title("val_loss over the search space")
    fig.tight_layout()
    fig.savefig(contour_path, dpi=100)
    plt.close(fig)


def make_report(study: str, root: str | Path = "runs", samples_shown: int = 4, address: str | None = None) -> Path:
    """From the study folder alone: the best checkpoint (with its saved normalisation) and the
    test split saved beside the summary; ROOT/data is not read."""
    from raypd import ode
    from raypd.dataset import metrics as test_metrics
    from raypd.predict import load_best, resimulate
    from raypd.serve import TEST_SPLIT_FILE, SavedModel, iter_test_split, read_test_split
    from raypd.tune import SUMMARY_FILE

    root = Path(root)
    config, summary, checkpoint = load_best(study, root)
    study_dir = root / "tune" / study
    check_writable(study_dir, "--root")
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
    space_plots(summary, study_dir / "parallel_coordinates.png", study_dir / "contour.png")
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
    log_to_mlflow(root, study, summary, [study_dir / name for name in pictures] + [report])
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
    from raypd.dataset import metrics as test_metrics
    from raypd.intervals import DEFAULT_LEVEL, add_noise, coverage
    from raypd.predict import next_best_models, refined_calibration
    from raypd.refine import FitProblem, refine_with_intervals

    level = DEFAULT_LEVEL if level is None else level
    problem = FitProblem.from_data_config(config.data, times)
    calibration = refined_calibration(study_dir, model, problem, address)
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
    plt = _figures()
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    count = len(shown["estimate"])
    x = np.arange(count)
    for ax, (j, name) in zip(axes.ravel(), enumerate(names)):
        # intervals as bars (an unidentified series' refined estimate may lie outside the
        # model-only interval it keeps)
        for offset, prefix, colour, marker, label in ((-0.15, "model_", "tab:orange", "o", "model"),
                                                      (0.15, "", "tab:blue", "s", "refined")):
            estimate = np.array(shown[f"{prefix}estimate"])[:, j]
            ax.vlines(x + offset, np.array(shown[f"{prefix}lower"])[:, j], np.array(shown[f"{prefix}upper"])[:, j],
                      color=colour, lw=1)
            ax.plot(x + offset, estimate, marker, ms=3, color=colour, label=label)
        ax.plot(x, y_true[:count, j], "k_", ms=9, mew=2, label="truth")
        ax.set(title=name, xlabel="test series")
    axes.ravel()[0].legend(fontsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_to_mlflow(root: Path, study: str, summary: dict, files: list[Path]) -> None:
    """The pictures and the page as artifacts of the best trial's MLflow run, and the refined
    test figures as its metrics."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    store = Path(root).absolute() / "mlflow.db"
    if not store.exists():  # a study tracked elsewhere (--tracking-uri): do not create a store here
        return
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(f"raypd-{study}")
    if experiment is None:
        return
    for run in client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.trial_id = '{summary['best_trial_id']}'"):
        for path in files:
            client.log_artifact(run.info.run_id, str(path), artifact_path="report")
        if summary["refined"] is None:
            continue
        now = int(__import__("time").time() * 1000)
        values = {f"{kind}_{key}": summary["refined"][kind][key] for kind in ("clean", "noise_2pct")
                  for key in ("model_mse", "refined_mse", "identified")}
        values.update({f"{kind}_{key}": summary["refined"][kind][key]["all"] for kind in ("clean", "noise_2pct")
                       for key in ("coverage_model", "coverage_refined")})
        client.log_batch(run.info.run_id, metrics=[Metric(f"test_{k}", float(v), now, 0) for k, v in values.items()
                                                   if v is not None])


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
