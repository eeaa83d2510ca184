"""Stage 4: a study's report: report.html with PNGs beside it, logged to MLflow.

    python -m raypd.report --study NAME [--root runs]

Pictures: validation-loss curves of every trial (ASHA-stopped trials end early), true vs
predicted per target for the best model on the test split (with R²), true vs re-simulated
series of a few test samples (the ODE solved from the predicted parameters and initial
conditions: the notebook's "real test"), parallel coordinates and a contour of the search
space against the validation loss, and a table of trials. The best model's re-simulation
error (MSE between true and re-simulated series over the test split) goes into summary.json.
"""

from __future__ import annotations

import html
import json
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


def make_report(study: str, root: str | Path = "runs", samples_shown: int = 4) -> Path:
    """From the study folder alone: the best checkpoint (with its saved normalisation) and the
    test split saved beside the summary; ROOT/data is not read."""
    from raypd import ode
    from raypd.dataset import metrics as test_metrics
    from raypd.predict import load_best, resimulate
    from raypd.serve import TEST_SPLIT_FILE, SavedModel, read_test_split
    from raypd.tune import SUMMARY_FILE

    root = Path(root)
    config, summary, checkpoint = load_best(study, root)
    study_dir = root / "tune" / study
    check_writable(study_dir, "--root")
    model = SavedModel.load(checkpoint)
    test_ids, y_true, series = read_test_split(study_dir / TEST_SPLIT_FILE, model.series_shape)
    y_pred = model.predict(series)
    times = np.asarray(model.meta["time_points"])
    resim = resimulate(y_pred, times, config.data.n_actions)
    ok = ~np.isnan(resim).any(axis=(1, 2))
    summary["resimulation_mse"] = float(np.mean((resim[ok] - series[ok]) ** 2)) if ok.any() else None
    summary["resimulation_diverged"] = int((~ok).sum())

    pictures = {
        "curves.png": "Validation loss of every trial",
        "true_vs_predicted.png": "Best model on the test split: true vs predicted, per target",
        "resimulated.png": "True vs re-simulated series (ODE solved from the predicted parameters and initial conditions)",
        "parallel_coordinates.png": "The search space: parallel coordinates",
        "contour.png": "The search space: validation loss",
    }
    curves(summary, study_dir, study_dir / "curves.png")
    metrics = test_metrics(y_true, y_pred, model.target_names)
    true_vs_predicted(model.target_names, y_true, y_pred, metrics, study_dir / "true_vs_predicted.png")
    shown = np.arange(min(samples_shown, len(test_ids)))
    resimulated(times, series[shown], resim[shown], test_ids[shown], ode.channel_names(config.data.n_actions),
                study_dir / "resimulated.png")
    space_plots(summary, study_dir / "parallel_coordinates.png", study_dir / "contour.png")

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
{images}
<h2>Trials</h2><table><tr><th>trial</th><th>status</th><th>epochs</th><th>best val_loss</th><th>config</th></tr>{rows}</table>
</body></html>"""
    write_json(study_dir / SUMMARY_FILE, summary)  # last: a report that fails leaves the summary as it was
    report = study_dir / "report.html"
    report.write_text(page)
    log_to_mlflow(root, study, summary, [study_dir / name for name in pictures] + [report])
    return report


def log_to_mlflow(root: Path, study: str, summary: dict, files: list[Path]) -> None:
    """The pictures and the page as artifacts of the best trial's MLflow run."""
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


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m raypd.report", description="Write a study's report.html with pictures.")
    p.add_argument("--study", required=True, help="the study to report on")
    p.add_argument("--root", default="runs", help="the study's root (default %(default)s)")
    args = p.parse_args(argv)

    def body() -> int:
        print(make_report(args.study, args.root))
        return 0

    run_main("raypd.report", body)


if __name__ == "__main__":
    main()
