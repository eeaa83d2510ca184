"""Nothing in raypd deserialises with code execution: checkpoints load with
torch.load(weights_only=True), YAML with safe_load, and no module uses pickle directly.
(Tune's own restore reads its experiment files from ROOT: see the README.)"""

import re

from tests.conftest import REPO

SOURCES = sorted((REPO / "raypd").glob("*.py"))


def test_checkpoints_load_with_weights_only():
    calls = [(p.name, m.group(0)) for p in SOURCES for m in re.finditer(r"torch\.load\([^)]*\)", p.read_text())]
    assert calls  # the checkpoints are loaded somewhere
    assert all("weights_only=True" in call for _, call in calls), calls


def test_no_pickle_and_only_safe_yaml():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import cloudpickle|import dill)", text, re.M), path
        assert "pickle.load" not in text, path
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", text), path
