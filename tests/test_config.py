import subprocess
import sys

import pytest

from cluster.config import ConfigError, load_config
from tests.conftest import ROOT


def test_defaults_validate():
    cfg = load_config()
    assert cfg.train.workers == 2 and cfg.kafka.bootstrap_servers is None


def test_yaml_then_overrides_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  workers: 3\n  duration_s: 10\noptim:\n  batch_size: 64\n")
    cfg = load_config(f, ["train.workers=4", "model.id_dropout=0.25"], **{"train.duration_s": 5.0})
    assert (cfg.train.workers, cfg.train.duration_s, cfg.optim.batch_size, cfg.model.id_dropout) == (4, 5.0, 64, 0.25)


@pytest.mark.parametrize("override, field", [
    ("train.workers=0", "train.workers"),
    ("model.patchh=4", "model.patchh"),
    ("optim.zero_stage=3", "optim.zero_stage"),
    ("kafka.interaction_partitions=many", "kafka.interaction_partitions"),
    ("model.frame_size=30", "frame_size=30"),
    ("train.workers=5", "must divide 48"),
    ("run_name=a/b", "run_name"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in err.value.message


def test_cli_stops_at_start_with_the_field_name():
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "demo", "--set", "optim.batch_size=-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "optim.batch_size" in proc.stderr
