"""The project's own promises: setup files agree, CI runs the README's test command."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from covidlib import cli

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!\[ ;]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_name(r) for r in pip if not r.startswith("-e")}
    assert listed == wanted
    assert any(r.startswith("-e") and ".[dev]" in r for r in pip), "editable install of the package"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "research use only" in readme.lower()
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_make_test_runs_the_suite_on_two_workers_one_file_each():
    # Under 10 minutes on 2 cores needs two workers; --dist loadfile keeps each module's fixtures
    # (the installed-wheel pipeline run feeds several tests) in one worker, run once.
    make = (ROOT / "Makefile").read_text()
    recipe = make.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"-m pytest .*-n 2 --dist loadfile", recipe), recipe


def test_cli_help_is_fast_and_complete():
    out = subprocess.run([sys.executable, "-m", "covidlib", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    registered = [add.__name__.removeprefix("_add_") for add in cli.SUBCOMMANDS]
    for cmd in dict.fromkeys(["run", "notebooks", "download", "audit", "enhance", "train", "evaluate",
                              "predict", "export", *registered]):
        assert cmd in out.stdout
        sub = subprocess.run([sys.executable, "-m", "covidlib", cmd, "--help"],
                             capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0 and "usage" in sub.stdout
    # "Fast" without a timing: building the parser reads no notebook and loads no framework.
    code = ("import sys; from covidlib import cli; cli.build_parser(); "
            "bad = {'keras', 'tensorflow', 'papermill', 'cv2'} & set(sys.modules); "
            "sys.exit(str(sorted(bad)) if bad else 0)")
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert heavy.returncode == 0, heavy.stderr


def test_every_subcommand_is_registered():
    """A sub-command is a cmd_<name> and an _add_<name> function, and one entry of SUBCOMMANDS."""
    registered = [add.__name__.removeprefix("_add_") for add in cli.SUBCOMMANDS]
    assert sorted(registered) == sorted(n.removeprefix("_add_") for n in vars(cli) if n.startswith("_add_"))
    assert sorted(registered) == sorted(n.removeprefix("cmd_") for n in vars(cli) if n.startswith("cmd_"))
    sub = cli.build_parser().parse_args(["notebooks", "somewhere"])
    assert sub.func is cli.cmd_notebooks and sub.dest == "somewhere"


def test_light_modules_do_not_import_keras():
    code = ("import sys; import covidlib.cli, covidlib.config, covidlib.images, covidlib.datasets, "
            "covidlib.audit, covidlib.enhance, covidlib.enhance_batch, covidlib.synthetic, covidlib.evaluate; "
            "sys.exit(1 if {'keras', 'tensorflow'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_cli_bad_input_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "covidlib", "enhance", str(tmp_path / "nope"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "error" in out.stderr


def test_no_library_function_is_longer_than_80_lines():
    """Functions a reader holds in their head: split a longer one into named steps."""
    import ast

    long = []
    for path in sorted((Path(cli.__file__).parent).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
