"""What `pip install smolds` gets: a wheel that runs without a checkout, and a checkout without copies that drift.

The slow test builds the sdist and, from the sdist, the wheel (`python -m build`, no network), checks both
with twine, installs the wheel (`--no-deps`) into a fresh venv outside the checkout and runs it from an
empty directory: `--version`, `prep`, a 20-step `train`, `generate`, the launcher and `slurm-script`.
The venv sees this interpreter's packages through a .pth file rather than `--system-site-packages`, which
would also run this interpreter's .pth hooks, among them the editable install's finder: that finder would
serve a module missing from the wheel from the checkout, and hide the very bug this test looks for.

The fast tests hold the checkout to the one source of each file: presets and the launch files live in the
package, the top-level launch/ and slurm/ link to them, configs/ holds run configs that name presets, and
the version, licence and README badges agree with what they describe.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import smolds
from smolds.cli import COMMANDS, main
from smolds.config import PRESET_DIR, presets
from smolds.launch.slurm_script import SBATCH, write_slurm_script
from smolds.train.config import RunConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("smolds", "data_prep")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- the checkout: one source for each file ----------------------------------------------------------

def test_presets_ship_in_the_package_and_only_there():
    assert PRESET_DIR == Path(smolds.__file__).parent / "presets"
    assert "tiny" in presets() and "smollm2-deepseek-135m" in presets()
    strays = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.y*ml")
                    if "model" not in (yaml.safe_load(p.read_text()) or {}))
    assert not strays, f"model presets outside smolds/presets/: {strays}; git mv them there"


def test_example_run_configs_name_shipped_presets():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        model = RunConfig.load(path).model
        name = model.get("preset") if isinstance(model, dict) else model
        assert name in presets(), f"{path.name}: model {model!r} is not a preset in smolds/presets/"
    # `smolds train` with no arguments is the documented example, field for field
    assert RunConfig.load(ROOT / "configs" / "tiny-cpu.yaml") == RunConfig()


@pytest.mark.parametrize("link, target", [
    ("launch/launch.py", "smolds/launch/launch.py"),
    ("launch/check_dist.py", "smolds/launch/check_dist.py"),
    ("slurm/pretrain.sbatch", "smolds/launch/pretrain.sbatch"),
])
def test_checkout_entry_points_link_to_the_package(link, target):
    assert (ROOT / link).is_symlink() and (ROOT / link).resolve() == ROOT / target


def test_launcher_runs_as_a_module_outside_the_checkout(tmp_path):
    out = subprocess.run([sys.executable, "-m", "smolds.launch", "--dry-run", "--device", "cpu", "--check"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(str(ROOT / "smolds" / "launch" / "check_dist.py"))


def test_slurm_script_writes_the_shipped_sbatch(tmp_path):
    out = write_slurm_script(tmp_path)
    assert out == tmp_path / "pretrain.sbatch" and out.read_text() == SBATCH.read_text()
    assert os.access(out, os.X_OK)
    assert subprocess.run(["bash", "-n", str(out)], timeout=30).returncode == 0
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        write_slurm_script(out)


def test_version_in_one_place(capsys):
    assert "version" in PYPROJECT["project"]["dynamic"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "smolds.__version__"}
    assert importlib.metadata.version("smolds") == smolds.__version__, "stale install: pip install -e . again"
    assert main(["--version"]) == 0 and capsys.readouterr().out == f"smolds {smolds.__version__}\n"
    assert re.search(rf"^## \[{re.escape(smolds.__version__)}\]", (ROOT / "CHANGELOG.md").read_text(), re.M)


def test_licence_agrees_with_pyproject():
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]


def test_readme_badges_state_what_ci_enforces():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    floor = re.search(r"--cov-fail-under[= ](\d+)", ci).group(1)
    assert re.search(rf"badge/coverage-%E2%89%A5%20{floor}%25-", readme), f"coverage badge != floor {floor}%"
    urls = PYPROJECT["project"]["urls"]
    assert f"({urls['Source']}/actions/workflows/ci.yml/badge.svg)" in readme
    assert "bash .ci/run" in (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert f"({urls['Documentation']})" in readme and "(LICENSE)" in readme


def test_cli_reference_documents_every_command():
    """The docs' CLI page is generated by docs/hooks/cli_reference.py from the source, without importing it."""
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "hooks" / "cli_reference.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    assert hook.commands() == COMMANDS
    page = hook.on_page_markdown((ROOT / "docs" / "api" / "cli.md").read_text(),
                                 SimpleNamespace(file=SimpleNamespace(src_uri="api/cli.md")))
    assert [f"smolds {name}" for name in COMMANDS] == re.findall(r"^### (smolds \S+)$", page, re.M)


# --- the wheel, installed outside the checkout ------------------------------------------------------

def copy_checkout(dest: Path) -> None:
    """The files a clone would have: tracked and untracked-but-not-ignored (no caches, no build output)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, timeout=60, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if os.path.lexists(ROOT / name):  # a tracked file deleted in the work tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name, follow_symlinks=False)


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    src, dist, venv, work = (tmp_path / d for d in ("src", "dist", "venv", "work"))
    copy_checkout(src)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)], tmp_path, env)
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    assert wheel.name == f"smolds-{smolds.__version__}-py3-none-any.whl"
    run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)], tmp_path, env)

    # the wheel holds exactly the packages' files (modules, presets, the sbatch script): no tests, benches, caches
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}
    expected = {str(p.relative_to(src)) for pkg in PACKAGES for p in (src / pkg).rglob("*") if p.is_file()}
    assert shipped == expected, f"missing: {sorted(expected - shipped)}; extra: {sorted(shipped - expected)}"
    assert {f"smolds/presets/{name}.yaml" for name in presets()} <= shipped
    in_sdist = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "smolds/presets/tiny.yaml"} <= in_sdist
    assert not [n for n in in_sdist if n.startswith(("tests/", "bench/")) or "__pycache__" in n]

    # a venv outside the checkout that sees this interpreter's packages (see the module docstring)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python, smolds_cmd = venv / "bin" / "python", venv / "bin" / "smolds"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip()
    Path(purelib, "outer-site-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        tmp_path, env)

    work.mkdir()
    env["OMP_NUM_THREADS"] = "1"  # one process on a shared machine: OpenMP threads would only contend
    where = run([str(python), "-c", "import smolds, data_prep; print(smolds.__file__, data_prep.__file__)"], work, env)
    assert all(f.startswith(purelib) for f in where.split()), where
    assert run([str(smolds_cmd), "--version"], work, env) == f"smolds {smolds.__version__}\n"

    from pydoc_data.topics import topics  # a small English + Python text that every CPython has

    (work / "corpus.txt").write_text("\n\n".join(topics[k] for k in sorted(topics))[:150_000])
    run([str(smolds_cmd), "prep", "corpus.txt", "--out", "data/mine", "--vocab-size", "1024", "--workers", "1"],
        work, env)
    log = run([str(smolds_cmd), "train", "--data.dir", "data/mine", "--train.out_dir", "runs/t",
               "--train.steps", "20", "--train.seq_len", "32", "--train.micro_batch", "2", "--train.warmup_steps", "2",
               "--train.eval_every", "20", "--train.eval_batches", "1", "--train.checkpoint_every", "20",
               "--eval.prompts", '["The "]', "--eval.sample_tokens", "4", "--logging.wandb", "disabled"], work, env)
    assert "done: 20 steps" in log and (work / "runs" / "t" / "checkpoints" / "latest").is_file(), log
    text = run([str(smolds_cmd), "generate", "runs/t", "The ", "--max-new-tokens", "8", "--seed", "0"], work, env)
    assert text.startswith("The ") and len(text) > len("The \n"), text

    check = run([str(python), "-m", "smolds.launch", "--dry-run", "--device", "cpu", "--check"], work, env)
    assert check.strip().endswith(str(Path(purelib, "smolds", "launch", "check_dist.py"))), check
    run([str(smolds_cmd), "slurm-script"], work, env)
    assert (work / "pretrain.sbatch").read_text() == (src / "slurm" / "pretrain.sbatch").read_text()
