"""The package as a user meets it: a bare import, --help, zoo conversions, inspect."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

HEAVY = ("torch", "tensorflow", "tf2onnx", "keras", "ray", "tensorrt", "onnxruntime", "grpc", "aiohttp")


def test_import_and_help_load_no_heavy_framework():
    code = ("import sys, onnxpipe, onnxpipe.cli, onnxpipe.passes, onnxpipe.runtimes\n"
            "from onnxpipe.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_module_imports_in_a_bare_process():
    import pkgutil

    import onnxpipe

    names = [m.name for m in pkgutil.walk_packages(onnxpipe.__path__, "onnxpipe.") if not m.name.endswith("__main__")]
    code = "import importlib\nfor n in %r:\n    importlib.import_module(n)\nprint('ok')" % names
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("onnxpipe ")


@pytest.mark.slow
@pytest.mark.parametrize("zoo, framework", [("digits_cnn", "torch"), ("keras_digits", "tensorflow"),
                                            ("tiny_transformer", "torch")])
def test_zoo_models_convert_and_pass_their_check(tmp_path, zoo, framework):
    pytest.importorskip("torch" if framework == "torch" else "tensorflow")
    out = tmp_path / f"{zoo}.onnx"
    proc = run_cli("convert", f"models/{zoo}/model.py:build", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["framework"] == framework and doc["check"]["ok"]
    assert {r["batch"] for r in doc["check"]["runs"]} == {4, 6}  # the dynamic batch axis works
    inspect = run_cli("inspect", str(out), "--json", "--batch-size", "2")
    assert inspect.returncode == 0, inspect.stderr
    summary = json.loads(inspect.stdout)
    assert summary["cost"]["flops"] > 0 and summary["parameters"]["count"] > 1000
    assert summary["cost"]["uncounted"] == []


def test_inspect_cli_flops_match_hand_count(conv_gemm_path):
    proc = run_cli("inspect", str(conv_gemm_path), "--json", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    conv_macs = 4 * 8 * 8 * 3 * 3 * 3  # Cout * H * W * Cin * kh * kw
    gemm_macs = 256 * 10
    assert doc["cost"]["macs"] == 2 * (conv_macs + gemm_macs)
    bad = run_cli("inspect", str(conv_gemm_path), "--dim", "oops")
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr


def test_every_command_renders_its_help():
    from typer.testing import CliRunner

    from onnxpipe.cli import app

    runner = CliRunner()
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"convert", "inspect", "optimize", "run", "infer", "validate", "bench", "serve", "split", "tune"} <= set(commands)
    for name in commands:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output, result.exception)


def test_pyproject_lists_every_package_and_the_zoo_under_its_own_name():
    """packages are listed by hand (the zoo folder installs as onnxpipe_zoo): a new folder must be added."""
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = conf["package-dir"]
    assert dirs == {"onnxpipe_zoo": "models"}
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("onnxpipe/**/__init__.py")}
    on_disk |= {".".join(("onnxpipe_zoo",) + p.parent.relative_to(ROOT / "models").parts)
                for p in ROOT.glob("models/**/__init__.py")}
    assert set(conf["packages"]) == on_disk


def test_nothing_edits_sys_path_at_import_time():
    """The zoo imports as onnxpipe_zoo and the benchmarks run against the installed package."""
    offenders = [str(p.relative_to(ROOT)) for folder in ("onnxpipe", "models", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py")
                 if "sys.path.insert" in p.read_text() and p.name != "userfiles.py"]
    assert offenders == []


def test_no_import_cycle_between_files():
    """The floors hold file by file too: no module reaches itself through its imports (lazy ones count)."""
    grimp = pytest.importorskip("grimp")  # import-linter's graph library (the dev extra)

    graph = grimp.build_graph("onnxpipe", cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    order, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(start):  # Tarjan's strongly connected components, iteratively
        work = [(start, iter(sorted(edges[start])))]
        order[start] = low[start] = len(order)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in order:
                    order[child] = low[child] = len(order)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], order[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == order[node]:
                group = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    group.append(m)
                    if m == node:
                        break
                if len(group) > 1:
                    cycles.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in order:
            visit(module)
    assert cycles == [], cycles
