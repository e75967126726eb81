"""What a newcomer meets first: the README's commands, the command line's errors, and docs whose
defaults and supported lists are the code's (issue 11), and a command line that loses no work
(issue 10, build item 6)."""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

import fpsolve
from fpsolve import cli
from fpsolve.cli import COMMANDS, main
from fpsolve.cli import sample as sample_cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
BASH = re.compile(r"^```bash\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


# -- the README's commands ------------------------------------------------------------------------


def setup_blocks() -> list[list[str]]:
    """The command lines of each bash block of the README's set-up section."""
    section = README.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [[line for line in block.splitlines() if line.strip()] for block in BASH.findall(section)]


def test_the_readme_has_two_setup_blocks_demo_and_tests_in_a_fresh_venv():
    demo, tests = setup_blocks()  # exactly two: unpacking fails otherwise
    for block in (demo, tests):
        assert block[0].startswith("python3 -m venv .venv && . .venv/bin/activate")
        result = subprocess.run(["bash", "-n"], input="\n".join(block), text=True, capture_output=True)
        assert result.returncode == 0, result.stderr  # each block is valid bash
    assert demo[-1].endswith("&& fpsolve demo")
    assert tests[-1].endswith("&& python -m pytest -q")


def test_ci_runs_the_readmes_test_command_verbatim():
    command = setup_blocks()[1][-1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines


def fpsolve_commands(texts: list[str]) -> list[list[str]]:
    """The arguments of every ``fpsolve ...`` (or ``... -m fpsolve ...``) command in ``texts``."""
    found = []
    for text in texts:
        for part in re.split(r"&&|\n", text.replace("\\\n", " ")):
            words = shlex.split(part.strip(), comments=True)
            if "fpsolve" not in words:
                continue
            start = words.index("fpsolve")
            if start + 1 < len(words) and (start == 0 or words[start - 1] == "-m"):
                found.append(words[start + 1 :])
    return found


def readme_fpsolve_commands() -> list[list[str]]:
    """Every ``fpsolve ...`` command the README shows, in code blocks or inline code."""
    return fpsolve_commands(re.findall(r"`([^`\n]+)`", README) + BASH.findall(README))


def test_every_fpsolve_command_in_the_readme_parses():
    commands = readme_fpsolve_commands()
    assert {c[0] for c in commands} >= {"demo", "bench", "sample", "plugins"}
    for words in commands:
        name, rest = words[0], [w for w in words[1:] if w != "--help"]
        assert name in COMMANDS, f"the README shows an unknown command: fpsolve {' '.join(words)}"
        parser = command_parser(name)
        parser.parse_args(rest)  # SystemExit (a failed test) on an option the command does not take


def test_every_fpsolve_command_in_the_docs_shell_blocks_parses():
    texts = [block for page in sorted(DOCS.rglob("*.md")) for block in BASH.findall(page.read_text())]
    commands = fpsolve_commands(texts)
    assert len(commands) >= 5
    for words in commands:
        command_parser(words[0]).parse_args([w for w in words[1:] if w != "--help"])


def test_readme_lists_the_supported_pipelines_and_schedulers_from_the_code():
    from fpsolve.integrations.diffusers.pipelines import ADAPTERS
    from fpsolve.integrations.diffusers.schedulers import supported_names

    for label, names in (("pipelines", sorted(ADAPTERS)), ("schedulers", supported_names())):
        line = re.search(rf"Supported {label}: (.*?)(\.|\n\()", README, re.DOTALL)
        assert line, f"the README does not list the supported {label}"
        assert re.findall(r"`(\w+)`", line[1]) == names


def test_diffusers_page_tables_cover_exactly_the_supported_pipelines_and_schedulers():
    from fpsolve.integrations.diffusers.pipelines import ADAPTERS
    from fpsolve.integrations.diffusers.schedulers import supported_names

    page = (DOCS / "diffusers.md").read_text()
    first_cells = re.findall(r"^\| ([^|]+) \|", page, re.MULTILINE)
    pipelines = {n for cell in first_cells for n in re.findall(r"`(\w+Pipeline)`", cell)}
    schedulers = {n for cell in first_cells for n in re.findall(r"`(\w+Scheduler)`", cell)}
    assert pipelines == set(ADAPTERS) and schedulers == set(supported_names())


# -- the command line ----------------------------------------------------------------------------


def command_parser(name: str) -> argparse.ArgumentParser:
    import importlib

    parser = cli.OneLineParser(prog=f"fpsolve {name}")
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    return parser


def test_an_unknown_command_names_the_closest_one(capsys):
    assert main(["sampel"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "fpsolve: unknown command 'sampel'; did you mean 'sample'?\n"
    assert captured.out == ""  # no wall of help
    assert main(["frobnicate"]) == 2
    valid = ", ".join(COMMANDS)
    assert capsys.readouterr().err == f"fpsolve: unknown command 'frobnicate'; valid commands: {valid}\n"


def test_version_and_the_real_exit_codes():
    run = [sys.executable, "-m", "fpsolve"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, cwd=ROOT)
    assert version.returncode == 0 and version.stdout == f"fpsolve {fpsolve.__version__}\n"
    typo = subprocess.run([*run, "sampel"], capture_output=True, text=True, cwd=ROOT)
    assert typo.returncode == 2 and "did you mean 'sample'?" in typo.stderr and "Traceback" not in typo.stderr


def test_a_bad_option_is_one_line(capsys):
    assert main(["sample", "--steps", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "fpsolve sample: argument --steps: invalid int value: 'x' (see fpsolve sample --help)\n"


@pytest.mark.parametrize("name", ["demo", "bench", "sample"])
def test_threads_wherever_the_model_runs(name):
    assert command_parser(name).parse_args([]).threads == 1


# -- docs defaults are the code's ----------------------------------------------------------------


def _shown(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, Path):
        return f"`{value.as_posix()}`"
    return f"`{value}`"


def option_rows(name: str) -> list[tuple[str, str, str]]:
    """``(option, default, help)`` of every option of ``fpsolve NAME``, as docs/reference/cli.md
    shows them."""
    rows = []
    for action in command_parser(name)._actions:
        if not action.option_strings or action.dest == "help":
            continue
        default = "off" if isinstance(action, argparse._StoreTrueAction) else _shown(action.default)
        help_text = (action.help or "").replace("%(default)s", str(action.default)).replace("|", "\\|")
        rows.append((f"`{action.option_strings[0]}`", default, help_text))
    return rows


@pytest.mark.parametrize("name", ["demo", "sample", "bench"])
def test_the_cli_reference_shows_every_option_with_its_default(name):
    page = (DOCS / "reference" / "cli.md").read_text()
    section = page.split(f"### `fpsolve {name}`", 1)[1].split("\n### ", 1)[0]
    rows = [
        tuple(cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1])
        for line in section.splitlines()
        if line.startswith("| `--")
    ]
    assert rows == option_rows(name)


@pytest.mark.parametrize("name", ["demo", "sample", "bench"])
def test_help_texts_state_the_real_defaults(name):
    for action in command_parser(name)._actions:
        claimed = re.search(r"\(default:? (-?[\d.e-]+)[,;)]", action.help or "")
        if claimed and action.default is not None:
            assert float(claimed[1]) == float(action.default), f"{action.option_strings}: {action.help}"


_NOT_A_VALUE = object()


def _literal(text: str):
    """The Python value a docs cell states (``2e-4``, ``None``, ``True``), or a marker for words
    such as ``required``, which describe rather than state a default."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return _NOT_A_VALUE


def test_builtins_reference_states_every_default_option_value():
    page = (DOCS / "reference" / "builtins.md").read_text()
    checked = 0
    for entry in fpsolve.list_plugins():
        if entry.alias_of is not None or not attrs.has(entry.cls):
            continue
        row = next((line for line in page.splitlines() if line.startswith(f"| `{entry.name}` |")), None)
        if row is None:
            continue  # plugin pages list their own names
        for field in attrs.fields(entry.cls):
            stated = re.search(rf"`{field.name}` \(([^)]*)\)", row)
            if stated is None or field.default is attrs.NOTHING or isinstance(field.default, attrs.Factory):
                continue
            value = _literal(stated[1].split(" ")[0])
            if value is _NOT_A_VALUE:
                continue
            assert value == field.default, f"builtins.md: {entry.name}.{field.name} is {field.default!r}"
            checked += 1
    assert checked >= 10


def test_tolerance_and_ridge_defaults_quoted_in_the_docs_are_the_codes():
    rms = {f.name: f.default for f in attrs.fields(fpsolve.stopping.RMS)}
    ridge = attrs.fields(fpsolve.solvers.TAA).ridge.default
    claims = [
        (r"default tolerance \(`?rms`?, ([\d.e-]+)\)", rms["tol1"]),
        (r"default rule is tighter,\s+`rms` with `tol1 = tol2 = ([\d.e-]+)`", rms["tol1"]),
        (r"`tol1=([\d.e-]+)`, `tol2=", rms["tol1"]),
        (r"`tol2=([\d.e-]+)`", rms["tol2"]),
        (r"rms rule's default, ([\d.e-]+)", rms["tol1"]),
        (r"`ridge=`, default ([\d.e-]+)", ridge),
    ]
    help_texts = " ".join(a.help or "" for a in command_parser("sample")._actions)
    texts = {p: p.read_text() for p in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]}
    texts["fpsolve sample --help"] = help_texts
    found = 0
    for pattern, value in claims:
        for where, text in texts.items():
            for match in re.finditer(pattern, text):
                assert float(match[1]) == value, f"{where}: {match[0]!r}, but the code's default is {value:g}"
                found += 1
    assert found >= 4


# -- fpsolve sample: --out as the help says, checked first, written atomically (issue 10) ---------


SMALL = ["sample", "--model", "gmm", "--steps", "6", "--samples", "2"]


def test_sample_out_suffixes(tmp_path, capsys):
    assert main([*SMALL, "--out", str(tmp_path / "s.pt")]) == 0
    saved = torch.load(tmp_path / "s.pt")
    assert saved["samples"].shape == (2, 64) and saved["model"] == "gmm" and saved["status"] == "CONVERGED"
    assert main([*SMALL, "--out", str(tmp_path / "s.safetensors")]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("samples"), saved["samples"]) and f.metadata()["steps"] == "6"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt", "s.safetensors"]  # no temporary left


def test_sample_png_grid_of_an_image_model(tmp_path, monkeypatch):
    from tests.test_demo import tiny_image_model

    monkeypatch.setattr("fpsolve.models.load_reference", lambda name: tiny_image_model())
    assert main(["sample", "--steps", "6", "--samples", "3", "--out", str(tmp_path / "grid.png")]) == 0
    import matplotlib.image

    grid = matplotlib.image.imread(tmp_path / "grid.png")
    assert grid.shape[:2] == (6 * 6, 6 * 16)  # 3 tiles of 4x4 in a row, 1-pixel borders, 6x


def test_sample_out_folder_gets_a_named_file(tmp_path, capsys):
    assert main([*SMALL, "--solver", "fp", "--seed", "3", "--out", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["samples-gmm-ddim6-fp-seed3.pt"]
    assert "saved (2, 64) samples to" in capsys.readouterr().out


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if a model is loaded: the command must refuse before sampling."""

    def refuse(*args, **kwargs):
        raise AssertionError("sampled before the options were checked")

    monkeypatch.setattr(sample_cli, "_load_model", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--timeout", "-1"], "--timeout must be a number of seconds > 0; got -1."),
        (["--timeout", "nan"], "--timeout must be a number of seconds > 0; got nan."),
        (["--threads", "0"], "--threads must be >= 1; got 0."),
        (["--repeats", "0"], "--repeats must be >= 1; got 0."),
        (["--out", "x.npy"], "--out x.npy: unknown suffix '.npy'; use one of .pt, .safetensors, .png, "
                             "or a folder."),
    ],
)
def test_sample_refuses_ignored_or_unusable_options_in_one_line(extra, message, capsys, no_sampling):
    assert main([*SMALL, *extra]) == 2
    assert capsys.readouterr().err == f"fpsolve sample (rank 0): {message}\n"


def test_sample_out_in_an_unwritable_place_fails_before_sampling(tmp_path, capsys, no_sampling):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*SMALL, "--out", str(blocker / "s.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fpsolve sample (rank 0): --out {blocker / 's.pt'}: {blocker} is a file")
    assert err.count("\n") == 1


def test_sample_png_of_a_vector_model_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    solved = []
    monkeypatch.setattr("fpsolve.api.solve", lambda *a, **k: solved.append(1))
    assert main([*SMALL, "--out", str(tmp_path / "x.png")]) == 2
    assert "the gmm model's samples are not images; use .pt or .safetensors" in capsys.readouterr().err
    assert not solved and not (tmp_path / "x.png").exists()


def test_a_failed_write_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    target = tmp_path / "s.pt"
    target.write_bytes(b"the previous run")

    def half_a_file(obj, path):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_a_file)
    assert main([*SMALL, "--out", str(target)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert target.read_bytes() == b"the previous run" and [p.name for p in tmp_path.iterdir()] == ["s.pt"]


def test_sample_reports_the_median_of_repeats(capsys, monkeypatch):
    from fpsolve import api

    real, times = api.solve, iter([3.0, 1.0, 2.0])

    def timed(*args, **kwargs):
        return attrs.evolve(real(*args, **kwargs), wall_time=next(times))

    monkeypatch.setattr(api, "solve", timed)
    threads = torch.get_num_threads()
    assert main([*SMALL, "--repeats", "3", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    assert "2.000 s (" in out and "median of 3 runs" in out


def test_sample_takes_the_models_own_sampler_and_refuses_one_that_does_not_fit(tmp_path, capsys):
    # digits-flow is a velocity model: the default --sampler auto gives flow Euler; a VP sampler
    # (which needs alphas_cumprod) is refused in one line before anything runs.
    out = tmp_path / "s.pt"
    flow = ["sample", "--model", "digits-flow", "--steps", "4", "--samples", "1", "--out", str(out)]
    assert main(flow) == 0
    assert "flow_euler-4" in capsys.readouterr().out and out.exists()
    assert main([*flow, "--sampler", "ddim"]) != 0
    err = capsys.readouterr().err
    assert "--sampler ddim does not fit --model digits-flow" in err and len(err.strip().splitlines()) == 1
