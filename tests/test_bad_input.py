"""Bad input to every stage, in one table: flags, config and study files, --set values and
dataset folders. Each case must end with exit code 2 and one line on stderr naming what is
wrong (and what is allowed), no traceback, and nothing on disk changed."""

import json

import pytest

from raypd.config import DataConfig, to_dict
from raypd.dataio import MANIFEST
from raypd.generate import generate
from tests.conftest import free_port, run_cli, snapshot
from tests.conftest import corrupt

DATA = DataConfig(samples=40, seed=4, mu_range=(0.0, 0.0), time_points=64, time_span=(0.0, 63.0))
HOPELESS = ["--pi-diag-range", "0.1", "0.1", "--gamma-diag-range", "0.1", "0.1", "--g-range", "0", "0",
            "--gamma-offdiag-range", "-3", "-3", "--pi-offdiag-range", "-3", "-3", "--n-actions", "2"]
DEEP = "model: {filters: [8, 8, 8, 8, 8, 8, 8], kernel_sizes: [3, 3, 3, 3, 3, 3, 3]}\n"

# (stage, study/config YAML or None, arguments, what the line must say)
CASES = [
    # raypd.generate: flags and --out
    ("generate", None, ["--samples", "0"], "samples must be >= 1"),
    ("generate", None, ["--samples", "-3"], "samples must be >= 1"),
    ("generate", None, ["--samples", "many"], "argument --samples: invalid int value"),
    ("generate", None, ["--n-actions", "0"], "n_actions must be 1, 2 or 3"),
    ("generate", None, ["--n-actions", "4"], "n_actions must be 1, 2 or 3"),
    ("generate", None, ["--mu-range", "1", "0"], "mu_range must have LOW <= HIGH"),
    ("generate", None, ["--mu-range", "0"], "argument --mu-range: expected 2 arguments"),
    ("generate", None, ["--g-range", "0", "nan"], "g_range must be two finite numbers"),
    ("generate", None, ["--v0-range", "-1e3", "-inf"], "v0_range must be two finite numbers LOW HIGH (got -1000.0 -inf)"),
    ("generate", None, ["--pi-diag-range", "-1", "1"], "pi_diag_range must be > 0"),
    ("generate", None, ["--time-points", "1"], "time_points must be >= 2"),
    ("generate", None, ["--time-span", "5", "5"], "time_span must be T0 < T1"),
    ("generate", None, ["--time-span", "10", "0"], "time_span must be T0 < T1"),
    ("generate", None, ["--seed", "-1"], "seed must be >= 0"),
    ("generate", None, ["--block-size", "0"], "block_size must be >= 1"),
    ("generate", None, ["--bogus"], "unrecognized arguments: --bogus"),
    ("generate", None, ["--out", "{file}"], "is a file; it must be a folder"),
    ("generate", None, ["--out", "{foreign}"], f"is a non-empty folder without {MANIFEST}"),
    ("generate", None, ["--out", "{other}", "--samples", "6"], "already holds a different dataset (differs in: samples)"),
    ("generate", None, ["--out", "{other}", "--samples", "5"], "drawn by an earlier raypd from other random streams"),
    ("generate", None, ["--out", "{listed}"], f"{MANIFEST} must hold a JSON object (got list)"),
    ("generate", None, HOPELESS, "no draw in 20000 tries from these sampling ranges passes the stability filter"),
    ("generate", None, ["--address", "127.0.0.1:1"], "cannot start or reach Ray at 127.0.0.1:1"),
    ("generate", None, ["--address", "nowhere"], "must be HOST:PORT, ray://HOST:PORT or auto"),
    # raypd.train: config file, --set, dataset folders
    ("train", "model: {filterz: [8]}\n", [], "unknown key model.filterz"),
    ("train", "train: {lr: fast}\n", [], "train.lr must be float"),
    ("train", "train: {epochs: 2.5}\n", [], "train.epochs must be int"),
    ("train", "model: {filters: [8, 8], kernel_sizes: [3]}\n", [], "must have the same length"),
    ("train", "model: {dropout: 1.0}\n", [], "model.dropout must be in [0, 1)"),
    ("train", "", ["--set", "train.lr=0"], "train.lr must be > 0"),
    ("train", "", ["--set", "train.epochs=0"], "train.epochs must be >= 1"),
    ("train", "", ["--set", "train.split=[0.5,0.5,0.5]"], "train.split must be three fractions"),
    ("train", "", ["--set", "train.gpus_per_worker=1.5"], "train.gpus_per_worker must be a fraction"),
    ("train", "", ["--set", "train.shuffle_buffer=0"], "train.shuffle_buffer must be >= 1 row"),
    ("train", "", ["--set", "train.streaming=maybe"], "train.streaming must be bool | None (got 'maybe')"),
    ("train", "", ["--set", "lr"], "--set 'lr' must look like key=value"),
    ("train", "", ["--set", "train.split=[0.98,0.01,0.01]"],
     "of the dataset's 40 leaves the val and calib split empty (train 39/val 0/calib 0/test 1)"),
    ("tune", "", ["--set", "data.samples=5"],
     "of data.samples 5 leaves the calib and test split empty (train 4/val 1/calib 0/test 0)"),
    ("train", "", ["--set", "train.calibration=1"], "train.calibration must be a share in (0, 1) (got 1.0)"),
    ("train", "", ["--set", "train.nope=1"], "unknown key train.nope"),
    ("train", "", ["--set", "data.samples=0"], "data.samples must be >= 1"),
    ("train", "", ["--set", "train.lr.x=1"], "train.lr must be float"),
    ("train", "[1, 2]\n", [], "must be a mapping of sections"),
    ("train", "model: [\n", [], "is not valid YAML"),
    ("train", "", ["--set", "train.lr=\x01"], "the value is not valid YAML"),
    ("train", None, ["--config", "{binary}"], "is not UTF-8 text (a YAML file is expected)"),
    ("train", DEEP, [], "64 time points are too few (need >= 128)"),
    ("train", None, ["--config", "{missing}"], "does not exist"),
    ("train", "", ["--data", "{bad:no manifest}"], f"no {MANIFEST}"),
    ("train", "", ["--data", "{bad:truncated}"], "not a readable raypd Parquet file"),
    ("train", "", ["--data", "{bad:missing file}"], f"listed in {MANIFEST} but missing"),
    ("train", "", ["--data", "{bad:foreign parquet}"], "not a readable raypd Parquet file"),
    ("train", "", ["--data", "{bad:row count}"], f"rows, {MANIFEST} says"),
    ("train", "", ["--data", "{bad:shape}"], "does not match n_actions"),
    ("train", "", ["--data", "{bad:nan}"], "column series holds NaN"),
    ("train", "", ["--data", "{bad:manifest not json}"], f"{MANIFEST} is not valid JSON"),
    ("train", "", ["--data", "{bad:entry without rows}"], "files must be a list of {{path: file name, rows: count}}"),
    ("train", "", ["--data", "{bad:series as strings}"], "column series is list<element: string>; it must hold"),
    ("train", "", ["--data", "{missing}"], "does not exist (generate it with raypd.generate)"),
    ("train", "", ["--data", "{file}"], "is a file; a dataset is a folder"),
    ("train", "", ["--out", "{file}/out"], "is a file, not a folder"),
    ("train", "", ["--out", "{file}"], "is a file; it must be a folder"),
    # raypd.tune: study files, --set, flags
    ("tune", "search: {space: {train.lr: {loguniform: [0, 1]}}}\n", [], "search.space.train.lr: loguniform needs 0 < lo"),
    ("tune", "search: {space: {train.lr: {normal: [0, 1]}}}\n", [], "search.space.train.lr must be one of"),
    ("tune", "search: {space: {conv: {int: [1]}}}\n", [], "search.space.conv: int needs a list of (2, 3)"),
    ("tune", "search: {space: {train.lrr: {uniform: [0.1, 0.2]}}}\n", [], "search.space.train.lrr: no config key train.lrr"),
    # conditional spaces (issue 31): a condition on an unknown key, a key no family has, a
    # value no family is (the other checks of the kind: test_config, in-process)
    ("tune", "search: {space: {model.family: {choice: [cnn, resnet]}, model.width: {int: [8, 16], "
             "when: {model.famly: resnet}}}}\n", [], "'model.famly' is not a choice of the space"),
    ("tune", "search: {space: {model.family: {choice: [cnn, resnet]}, model.depth: {int: [1, 3], "
             "when: {model.family: resnet}}}}\n", [], "search.space.model.depth: no config key model.depth"),
    ("tune", "search: {space: {model.family: {choice: [cnn, resnet]}, model.width: {int: [8, 16], "
             "when: {model.family: tcn}}}}\n", [], "model.family is never 'tcn' (its choices: cnn, resnet)"),
    ("tune", "search: {derive: {model.filters: {repeat: [8, nope]}}}\n", [], "repeat needs [value, VARIABLE]"),
    ("tune", "search: {searcher: grid}\n", [], "search.searcher must be one of optuna, hyperopt"),
    ("tune", "search: {space: {n: {int: [1, 8]}}, derive: {model.filters: {repeat: [8, n]}, "
             "model.kernel_sizes: {repeat: [3, n]}}}\n", [], "search space: model.filters has 8 conv blocks"),
    ("tune", "search: {num_samples: 0}\n", [], "search.num_samples must be >= 1"),
    ("tune", "search: {space: {1: {uniform: [0, 1]}}}\n", [], "search.space: names must be text"),
    ("tune", "search: {space: {train.batch_size: {int: [4, 16, 0]}}}\n", [], "int step must be >= 1"),
    ("tune", "search: {space: {train.batch_size: {uniform: [4, 16]}}}\n", [], "train.batch_size must be int (got 4.0)"),
    ("tune", "search: {space: {train.batch_size: {choice: [4, '8', 16]}}}\n", [], "train.batch_size must be int (got '8')"),
    ("tune", "search: {space: {n: {choice: [1, null]}}, derive: {model.filters: {repeat: [8, n]}, "
             "model.kernel_sizes: {repeat: [3, n]}}}\n", [], "repeat's count n must be a whole number (got None)"),
    ("tune", "search: {max_failures: -1}\n", [], "search.max_failures must be >= 0"),
    ("tune", "searchh: {}\n", [], "unknown key searchh"),
    ("tune", "train: {epochs: three}\n", [], "train.epochs must be int"),
    ("tune", "", ["--set", "search.space=5"], "search.space must be a mapping"),
    ("tune", "", ["--searcher", "grid"], "argument --searcher: invalid choice"),
    ("tune", "", ["--tracking-uri", "bogus://nowhere"], "--tracking-uri bogus://nowhere: Model registry functionality is unavailable"),
    ("tune", "", ["--tracking-uri", "http://127.0.0.1:{port}"], "no MLflow tracking server answers there"),
    ("tune", "", ["--root", "{file}"], "--root {file} is a file"),
    ("tune", "", ["--root", "{file}/sub"], "{file} is a file, not a folder"),
    ("generate", None, ["--out", "{file}/ds"], "{file} is a file, not a folder"),
    ("tune", None, ["--study", "nope"], "no study 'nope': tune_configs/ holds"),
    ("tune", None, [], "one of the arguments --study --config is required"),
]


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    generate(DATA, out, progress=False)
    return out


@pytest.mark.parametrize("stage, yaml_text, args, message", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(dataset, tmp_path, stage, yaml_text, args, message):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MANIFEST).write_text(json.dumps({"settings": to_dict(DataConfig(samples=5))}))
    (tmp_path / "binary.yaml").write_bytes(b"\x80\x81 not text")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / MANIFEST).write_text("[]")
    (tmp_path / "root").mkdir()
    places = {"file": tmp_path / "file", "foreign": tmp_path / "foreign", "other": tmp_path / "other",
              "missing": tmp_path / "missing", "listed": tmp_path / "listed",
              "binary": tmp_path / "binary.yaml", "port": free_port()}

    def fill(arg: str) -> str:
        if arg.startswith("{bad:"):
            return str(corrupt(dataset, tmp_path / arg[5:-1].replace(" ", "_"), arg[5:-1])[0])
        return arg.format(**places)

    args = [fill(a) for a in args]
    message = message.format(**places)
    if stage == "generate":
        args += [] if "--out" in args else ["--out", str(tmp_path / "new")]
        args += [] if "--samples" in args else ["--samples", "5"]
        args.append("--no-progress")
    if yaml_text is not None:
        (tmp_path / "study.yaml").write_text(yaml_text)
        args = ["--config", str(tmp_path / "study.yaml")] + args
    if stage == "train":
        args += [] if "--data" in args else ["--data", str(dataset)]
        args += [] if "--out" in args else ["--out", str(tmp_path / "out")]
    if stage == "tune" and "--root" not in args:
        args += ["--root", str(tmp_path / "root")]
    before = snapshot(tmp_path)
    # a tracking server that does not answer is refused at once, not after waiting for one
    # that may be starting (raypd.tracking.TRACKING_START_SECONDS; tests/test_tracking.py)
    result = run_cli(f"raypd.{stage}", *args, cwd=tmp_path, timeout=120, env={"RAYPD_TRACKING_START_SECONDS": "0"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith((f"raypd.{stage}: error:", f"python -m raypd.{stage}: error:"))
    assert snapshot(tmp_path) == before
