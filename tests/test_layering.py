"""The layering of the code base, enforced by parsing imports (ast), not by grepping text.

    spacetime (kernel)   -> nothing of ours
    captioner            -> kernel
    curation             -> kernel, captioner
    training             -> kernel, captioner (prompt upsampling at sampling)
    spacetime.cli, spacetime.__main__, spacetime.standins -> anything (they sit above the wings)

Every import counts, including those inside functions (lazy imports are still dependencies).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("spacetime", "captioner", "curation", "training")
TOP = ("spacetime.cli", "spacetime.__main__", "spacetime.standins")
ALLOWED = {
    "kernel": {"kernel"},
    "captioner": {"kernel", "captioner"},
    "curation": {"kernel", "captioner", "curation"},
    "training": {"kernel", "captioner", "training"},
    "top": {"kernel", "captioner", "curation", "training", "top"},
}


def layer(module: str) -> str | None:
    """The layer of a dotted module name of ours, None for third-party modules."""
    root = module.split(".")[0]
    if root not in PACKAGES:
        return None
    if any(module == t or module.startswith(t + ".") for t in TOP):
        return "top"
    return "kernel" if root == "spacetime" else root


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in `source`, relative imports resolved against `module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level] if node.level else []
                base = ".".join(anchor + ([base] if base else []))
            # `from spacetime import contract` imports the submodule spacetime.contract
            found += [(node.lineno, f"{base}.{alias.name}" if base in PACKAGES else base) for alias in node.names]
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    module = module_name(path)
    mine = layer(module)
    bad = []
    for line, target in imported_modules(source if source is not None else path.read_text(), module):
        theirs = layer(target)
        if theirs is not None and theirs not in ALLOWED[mine]:
            bad.append(f"{path.relative_to(ROOT)}:{line}: {module} ({mine}) imports {target} ({theirs})")
    return bad


def our_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_import_points_down():
    files = our_files()
    assert len(files) > 40 and any("standins" in str(p) for p in files)
    bad = [v for p in files for v in violations(p)]
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize("path, source", [
    ("training/data/decode.py", "from curation.analyze import upright\n"),  # a back-arrow main used to have
    ("curation/stage.py", "def f():\n    from training.train import run_train\n"),  # lazy, still counted
    ("captioner/core.py", "from curation import pipeline\n"),
    ("spacetime/contract.py", "import captioner.schema\n"),
    ("spacetime/models.py", "from spacetime.standins.tiny_models import build_all\n"),
    ("curation/filters.py", "from spacetime import standins\n"),
    ("training/train.py", "from spacetime.cli import main\n"),
])
def test_checker_flags_back_arrows(path, source):
    assert violations(ROOT / path, source), f"{path}: {source!r} should be flagged"


def test_checker_allows_downward_imports():
    assert not violations(ROOT / "training/train.py", "from spacetime.record import ClipRecord\nimport torch\n")
    assert not violations(ROOT / "spacetime/cli.py", "from curation.pipeline import run_curation\n")
    assert not violations(ROOT / "training/sample.py", "from captioner.upsample import upsample\n")


def test_kernel_and_training_load_no_ray_vllm_or_open_clip():
    modules = [module_name(p) for pkg in ("spacetime", "training") for p in (ROOT / pkg).rglob("*.py")
               if layer(module_name(p)) in ("kernel", "training") and not p.name.startswith("_")
               and p.name != "__main__.py"]
    code = ("import importlib, sys\n"
            f"for m in {sorted(modules)!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in ('ray', 'vllm', 'open_clip') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
