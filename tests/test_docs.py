"""The documentation site stays true to the code (`mkdocs build --strict` checks links).

- docs/troubleshooting.md has an entry for every error and warning in the source;
- the getting-started page's plan is what tools/getting_started.py prints today;
- every public name has an API reference entry, and an example in its docstring;
- the command line's help page covers every subcommand;
- the benchmark plots' tables are still in docs/benchmarks.md.

Collected on the TensorFlow flavours only (not in conftest's BACKEND_NEUTRAL).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import benchmark_plots  # noqa: E402
import messages  # noqa: E402
import mkdocs_hooks  # noqa: E402

import keras_parallel  # noqa: E402
from keras_parallel import callbacks, multi_worker, probes  # noqa: E402

DOCS = ROOT / "docs"
LEGACY = os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower() in ("1", "true")

#: Public names whose docstring has no "Example:" section yet. Remove a name once
#: its docstring has one (the last test below fails until you do).
LACKING_EXAMPLES: set[str] = set()


def public_names() -> dict[str, object]:
    """Every public name a user imports: keras_parallel.__all__, callbacks, DeviceProbe."""
    names = {
        f"keras_parallel.{n}": getattr(keras_parallel, n)
        for n in keras_parallel.__all__
        if n not in ("__version__", "callbacks", "multi_worker")
    }
    for name in callbacks.__all__:
        names[f"keras_parallel.callbacks.{name}"] = getattr(callbacks, name)
    for name in multi_worker.__all__:
        names[f"keras_parallel.multi_worker.{name}"] = getattr(multi_worker, name)
    names["keras_parallel.probes.DeviceProbe"] = probes.DeviceProbe
    return names


def test_every_name_a_submodule_exports_has_a_reference_entry():
    """What `keras_parallel.memory`, `.plan`, `.devices`, `.probes` and
    `.accumulation_plan` list in `__all__` is documented (constants aside)."""
    import importlib

    rendered = reference_paths()
    missing = []
    for module_name in ("memory", "plan", "devices", "probes", "accumulation_plan"):
        module = importlib.import_module(f"keras_parallel.{module_name}")
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue  # a constant: documented where it is defined
            if obj.__module__ in rendered:  # the whole module is rendered
                continue
            if f"{obj.__module__}.{obj.__qualname__}" not in rendered:
                missing.append(f"keras_parallel.{module_name}.{name}")
    assert not missing, "exported without a reference entry: " + ", ".join(missing)


def reference_paths() -> set[str]:
    """The objects docs/reference/*.md renders (`::: path` lines)."""
    paths = set()
    for page in (DOCS / "reference").glob("*.md"):
        paths |= set(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.M))
    return paths


# -- troubleshooting -----------------------------------------------------------


def test_message_scan_reads_raises_warnings_and_argument_checks():
    found = {m.phrase for m in messages.messages()}
    # A raise, a warn(...), an _invalid(...) argument check and a command-line error.
    assert "Each device may appear once. Received" in found
    assert "the model runs unsliced on it. The same script uses" in found
    assert "a number in (0, 1] or None" in found
    assert "no such file" in found
    assert len(found) > 40


def test_a_message_without_an_entry_is_reported():
    lacking = messages.missing(page_text="nothing here")
    assert {m.phrase for m in lacking} == {m.phrase for m in messages.messages()}


def test_every_error_and_warning_has_a_troubleshooting_entry():
    lacking = messages.missing()
    assert not lacking, (
        f"{len(lacking)} error/warning message(s) have no entry in docs/troubleshooting.md. "
        "Add an entry (the message quoted in a ```text block, its cause and its fix) "
        "containing the phrase shown:\n" + "\n".join(messages.describe(m) for m in lacking)
    )


# -- getting started -----------------------------------------------------------


@pytest.mark.skipif(LEGACY, reason="the script runs Keras 3 in its own process: once is enough")
def test_getting_started_plan_is_what_the_script_prints():
    committed = (DOCS / "generated" / "getting-started" / "plan.txt").read_text()
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "getting_started.py"), "--plan-only"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == committed, (
        "docs/generated/getting-started/plan.txt is not what tools/getting_started.py "
        "prints now: rerun `python tools/getting_started.py` and commit what it writes.\n"
        f"printed:\n{result.stdout}\ncommitted:\n{committed}"
    )


def test_getting_started_page_includes_sections_that_exist():
    page = (DOCS / "getting-started.md").read_text()
    script = (ROOT / "tools" / "getting_started.py").read_text()
    sections = re.findall(r'--8<-- "tools/getting_started.py:(\w+)"', page)
    assert {"model", "data", "parallel", "plan", "fit"} <= set(sections)
    for name in sections:
        assert f"# --8<-- [start:{name}]" in script and f"# --8<-- [end:{name}]" in script, name
    for name in re.findall(r'--8<-- "docs/generated/getting-started/([\w.]+)"', page):
        assert (DOCS / "generated" / "getting-started" / name).exists(), name


# -- API reference -------------------------------------------------------------


def test_every_public_name_has_a_reference_entry():
    rendered = reference_paths()
    missing = []
    for name, obj in public_names().items():
        if isinstance(obj, str):  # a constant: documented where it is defined
            path = name
        else:
            path = f"{obj.__module__}.{obj.__qualname__}"
        if path not in rendered:
            missing.append(f"{name} (add `::: {path}` to a page under docs/reference/)")
    assert not missing, "public names without an API reference entry:\n" + "\n".join(missing)


def test_public_names_have_examples_or_are_listed_as_lacking():
    without = {
        name
        for name, obj in public_names().items()
        if not isinstance(obj, str) and "Example" not in (inspect.getdoc(obj) or "")
    }
    assert without <= LACKING_EXAMPLES, (
        "public names without an `Example:` section in their docstring: "
        f"{sorted(without - LACKING_EXAMPLES)}"
    )
    assert LACKING_EXAMPLES <= without, (
        "these now have an example: remove them from LACKING_EXAMPLES in tests/test_docs.py: "
        f"{sorted(LACKING_EXAMPLES - without)}"
    )


def test_cli_page_has_the_help_of_every_subcommand():
    import keras_parallel_cli

    text = mkdocs_hooks.cli_help_markdown()
    commands = mkdocs_hooks.subcommands(keras_parallel_cli.build_parser())
    assert {"devices", "plan", "demo"} <= set(commands)
    assert "usage: keras-parallel [-h]" in text
    for command in commands:
        assert f"## `keras-parallel {command}`" in text
        assert f"usage: keras-parallel {command}" in text
    assert "--batch-size" in text and "--micro-batch-size" in text
    assert mkdocs_hooks.MARKER in (DOCS / "reference" / "cli.md").read_text()


# -- benchmarks ----------------------------------------------------------------


def test_benchmark_plot_tables_are_on_the_page():
    text = (DOCS / "benchmarks.md").read_text()
    figures = benchmark_plots.figures(text)
    assert {r["config"] for r in figures["data_parallel"]} == {
        "one core",
        "two apart",
        "DataParallel 2",
        "DataParallel 2, 5 steps a call",
        "Mirrored 2",
        "DataParallel 1",
        "bare",
    }
    assert all(len(r["repeats"]) > 1 for r in figures["data_parallel"])
    assert len(figures["accumulation_memory"]) == 2
    assert all(value > 0 for _, value in figures["xla"])
    assert len(figures["batch_norm"]["configs"]) == 4 and figures["batch_norm"]["epochs"]
    for image in re.findall(r"\]\((img/bench_[\w]+\.png)\)", text):
        assert (DOCS / image).exists(), image


# -- the getting-started page, run as written ----------------------------------


#: The comment line `_page_program` puts after each block.
BLOCK_END = "# --- block ---"


def _page_program(page: Path) -> str:
    """The page's Python blocks, top to bottom, with their snippet lines expanded."""
    text = page.read_text()
    blocks = re.findall(r"^([ \t]*)```python\n(.*?)^\1```", text, flags=re.M | re.S)
    program = []
    for indent, body in blocks:
        body = textwrap.dedent("\n".join(line[len(indent) :] for line in body.splitlines()))
        for line in body.splitlines():
            include = re.fullmatch(r'\s*--8<-- "([^":]+):(\w+)"', line)
            if include is None:
                program.append(line)
                continue
            source = (ROOT / include.group(1)).read_text()
            section = re.search(
                rf"# --8<-- \[start:{include.group(2)}\]\n(.*?)\n\s*# --8<-- "
                rf"\[end:{include.group(2)}\]",
                source,
                flags=re.S,
            ).group(1)
            program.append(textwrap.dedent(section))
        program.append(BLOCK_END)
    return "\n".join(program) + "\n"


@pytest.mark.skipif(LEGACY, reason="the page's code is Keras 3's")
def test_getting_started_page_runs_as_written_and_fit_runs_the_plan(tmp_path):
    program = _page_program(DOCS / "getting-started.md")
    assert "TF_CPU_ALLOCATOR_USE_BFC" in program and "import keras\n" in program
    # Smaller: 2 batches of 32, one epoch (the page trains 32 batches for 6 epochs).
    program = program.replace("Clips(batches=32)", "Clips(batches=2)")
    program = program.replace("epochs=6", "epochs=1")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS",)}
    env["KERAS_BACKEND"] = "tensorflow"
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    planned = re.search(r"micro_batch_size=(\d+):", result.stdout)
    logged = re.search(r"micro_batch_size: (\d+)", result.stdout)
    assert planned and logged, result.stdout[-3000:]
    assert int(planned.group(1)) == int(logged.group(1))  # fit runs what the plan printed
    assert (tmp_path / "video_classifier.keras").exists()


# -- the how-to pages, run as written ------------------------------------------

HOW_TO = DOCS / "how-to"


def _how_to_programs() -> tuple[dict[str, str], list[str]]:
    """({page: the set-up block, then the page's blocks}, [blocks that are files of their own]).

    A block whose first line is `# name.py` is a file of its own (a conftest.py):
    it runs alone, in a fresh process.
    """
    setup = _page_program(HOW_TO / "index.md")
    programs, files = {}, []
    for page in sorted(HOW_TO.glob("*.md")):
        if page.name == "index.md":
            continue
        continued = []
        for block in _page_program(page).split(f"\n{BLOCK_END}\n"):
            if not block.strip():
                continue
            if re.match(r"#\s*\w+\.py\s*\n", block.lstrip()):
                files.append(block)
            else:
                continued.append(block)
        if continued:
            programs[page.name] = setup + "\n".join(continued)
    return programs, files


def test_how_to_pages_say_what_their_code_needs():
    programs, _ = _how_to_programs()
    assert set(programs) >= {
        "unequal-gpus.md",
        "batches-that-do-not-fit.md",
        "saving-and-checkpoints.md",
        "memory-logs.md",
        "cpu-only.md",
    }
    for name in programs:
        assert "index.md#set-up" in (HOW_TO / name).read_text(), name


@pytest.mark.slow
@pytest.mark.skipif(LEGACY, reason="the pages' code is Keras 3's; once is enough")
def test_how_to_pages_run_as_written(tmp_path):
    """Every Python block of the how-to pages, after the recipes' set-up, with one epoch."""
    programs, files = _how_to_programs()
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS",)}
    env["KERAS_BACKEND"] = "tensorflow"
    runner = textwrap.dedent(
        """
        import sys, warnings
        warnings.simplefilter("ignore")  # the CPU stand-in's warnings (no memory figures)
        pages = {pages!r}
        for name, code in pages.items():
            print("page:", name, flush=True)
            exec(compile(code, name, "exec"), {{"__name__": "__main__"}})
        print("all pages ran")
        """
    )
    small = {n: re.sub(r"epochs=\d+", "epochs=1", code) for n, code in programs.items()}
    result = subprocess.run(
        [sys.executable, "-c", runner.format(pages=small)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all pages ran" in result.stdout
    assert (tmp_path / "train.csv").exists() and (tmp_path / "last.keras").exists()
    for code in files:  # a conftest.py: its own process, before TensorFlow starts
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]


# -- code blocks on the site ---------------------------------------------------

#: Columns a python or bash line on the site may use: the width the theme shows
#: without scrolling on a laptop screen (text blocks wrap: stylesheets/extra.css).
CODE_COLUMNS = 88


def test_code_lines_on_the_site_fit_without_scrolling():
    long_lines = []
    for page in sorted(DOCS.rglob("*.md")):
        blocks = re.findall(
            r"^([ \t]*)```(python|bash)\n(.*?)^\1```", page.read_text(), flags=re.M | re.S
        )
        for indent, _, body in blocks:
            for line in body.splitlines():
                if len(line) - len(indent) > CODE_COLUMNS:
                    long_lines.append(f"{page.relative_to(ROOT)}: {line.strip()[:60]}")
    assert not long_lines, f"lines over {CODE_COLUMNS} columns:\n" + "\n".join(long_lines)
    css = (DOCS / "stylesheets" / "extra.css").read_text()
    assert ".language-text pre > code" in css and "pre-wrap" in css
    config = (ROOT / "mkdocs.yml").read_text()
    assert "stylesheets/extra.css" in config and "pygments_lang_class: true" in config
