"""``experiments/gpu_session.py``: every step's command names options its script accepts, so a
renamed flag fails here and not in a scarce device session (the whole ``--dry-run`` takes
~90 s on CPU and is run by hand before a device call)."""

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def experiments():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(ROOT / "experiments"))


def _options(module, capsys) -> str:
    with pytest.raises(SystemExit):
        module.main(["--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("dry_run", [False, True], ids=["device", "dry-run"])
def test_each_step_runs_an_existing_script_with_options_it_accepts(experiments, capsys, tmp_path, dry_run):
    session = experiments("gpu_session")
    for name, *_ in session.STEPS:
        argv = session.step_argv(name, tmp_path, 100.0, dry_run)
        script = Path(argv[2])
        assert script.is_file(), script
        accepted = _options(experiments(script.stem), capsys)
        flags = [a for a in argv[3:] if a.startswith("--")]
        missing = [f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", accepted)]
        assert flags and not missing, (name, missing)


def test_unknown_step_is_refused(experiments, capsys, tmp_path):
    with pytest.raises(SystemExit):
        experiments("gpu_session").main(["--out", str(tmp_path), "--steps", "small,typo"])
    assert "unknown steps ['typo']" in capsys.readouterr().err


@pytest.mark.parametrize("size", [4096, 8192])
@pytest.mark.parametrize("m", [1, 16])
def test_breakdown_configs_fit_their_cases(experiments, size, m):
    """``experiments/w4a16_breakdown.py`` times fixed configs: each must pass the kernel API's
    checks at the shapes it is run at (a tile that does not fit would cost a device run)."""
    from qjax.kernels import api

    configs = experiments("w4a16_breakdown").configs(m, size)
    assert configs and any(cfg.split_reduce == "kernel" for _, cfg, _ in configs)
    for layout, cfg, _ in configs:
        api.check_config_gpu(cfg, "w4a16", m, size, size, None, layout)
