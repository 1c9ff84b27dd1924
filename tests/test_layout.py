"""The layout the design asks for: the engine stands alone, formulas live once in it, modules stay small."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("morse_engine", "nodes", "training", "scripts") for p in (ROOT / d).rglob("*.py")]
SOURCES.append(ROOT / "__init__.py")

# the scaled input x / sqrt(sigma^2 + 1) in any spelling, and CFG's u + w (c - u) / u + (c - u) w
SCALED_INPUT = re.compile(r"\*\*\s*2\s*\+\s*1\s*\)\s*(\*\*\s*0?\.5|\.sqrt\(\))")
GUIDANCE = r"[\w.]*(?:cfg|scale|guid|\bw\b)[\w.]*"  # what a guidance scale is called
CFG = re.compile(rf"\b(\w+)\s*\+\s*(?:{GUIDANCE}\s*\*\s*\(\s*\w+\s*-\s*\1\s*\)|\(\s*\w+\s*-\s*\1\s*\)\s*\*\s*{GUIDANCE})")


def imported_roots(path: Path) -> set:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level >= 1:
            target = path.parents[node.level - 1]  # the package a relative import starts from
            if not target.is_relative_to(ROOT / "morse_engine"):
                roots.add("<outside the engine>")
    return roots


def test_the_engine_never_imports_comfy_nodes_or_training():
    for path in (ROOT / "morse_engine").rglob("*.py"):
        bad = imported_roots(path) & {"comfy", "comfy_api", "folder_paths", "nodes", "training", "<outside the engine>"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_scaled_input_and_cfg_formulas_live_only_in_the_engine():
    for path in SOURCES:
        if path.is_relative_to(ROOT / "morse_engine"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert not SCALED_INPUT.search(code), f"{path.relative_to(ROOT)}:{i} writes the scaled input: {line.strip()}"
            assert not CFG.search(code), f"{path.relative_to(ROOT)}:{i} writes the CFG combination: {line.strip()}"


def test_the_formula_patterns_catch_what_they_are_for():
    assert SCALED_INPUT.search("x / (sigma**2 + 1) ** 0.5") and SCALED_INPUT.search("x / (s ** 2 + 1).sqrt()")
    assert CFG.search("eps = u + self.cfg * (c - u)") and CFG.search("return u + (c - u) * scale")
    assert CFG.search("uncond + w * (cond - uncond)")
    assert not CFG.search("x = x + d * (s_next - s)") and not CFG.search("hi + ramp * (lo - hi)")


def test_no_source_module_is_over_about_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"split these modules by concern: {long}"
