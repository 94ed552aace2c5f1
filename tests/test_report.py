"""report.py: JSON schema 1, Markdown, atomic writing and rich rendering of hand-built reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from repfuse import report as rpt
from repfuse.types import (
    FusionSite,
    ModuleInfo,
    RepfuseError,
    Report,
    SkippedSite,
    Summary,
    Verification,
)

FUSIONS = (
    FusionSite(
        module="stage1.0.reparam", pattern="3×3+1×1+identity, BN×3",
        branches=("stage1.0.rbr_dense", "stage1.0.rbr_1x1", "stage1.0.rbr_identity"),
        kernel=(3, 3), in_channels=64, out_channels=64, groups=2, stride=(1, 1), dilation=(1, 1),
        params_before=20_224, params_after=18_496, max_abs_error=3.2e-12,
    ),
    FusionSite(
        module="stage2.0.reparam", pattern="3×3 dil 2+1×1, BN×2", branches=("stage2.0.a", "stage2.0.b"),
        kernel=(3, 3), in_channels=64, out_channels=128, groups=1, stride=(2, 2), dilation=(2, 2),
        params_before=82_688, params_after=73_856,
    ),
)
SKIPPED = (SkippedSite(module="head.bn", reason="BN before a zero-padded conv is not exact at the border"),)
SUMMARY = Summary(fusions=2, params_before=1_000_000, params_after=900_000, macs_before=2_000_000_000,
                  macs_after=1_500_000_000, convs_before=10, convs_after=4, norms_before=9, norms_after=1)


def make_verification(passed: bool = True, err: float = 1.5e-6) -> Verification:
    return Verification(
        passed=passed, max_abs_error=err, max_rel_error=err / 10, exact_max_abs_error=2e-12,
        exact_max_rel_error=1e-13, atol=1e-5, rtol=1e-4, trials=3, input_shape=((2, 3, 33, 31),),
        seed=7, dtype="float32",
        worst_sites=(() if passed else (("stage2.0.reparam", err), ("stage1.0.reparam", 1e-3))),
        message="" if passed else "max abs error inf > atol 1e-05 at stage2.0.reparam",
    )


def make_report(verification: Verification | None = None, command: str = "convert",
                modules: tuple[ModuleInfo, ...] = ()) -> Report:
    return Report(
        tool={"name": "repfuse", "version": "0.1.0", "torch": "2.13.0"},
        command=command,
        input={"path": Path("/data/in.pt"), "format": "module", "dtype": "float32"},
        output={"path": "/data/out.pt"} if command == "convert" else None,
        fusions=FUSIONS, skipped=SKIPPED, summary=SUMMARY, verification=verification,
        timings={"load": 0.12, "fuse": 0.5, "verify": 1.25},
        warnings=("model had 2 BN layers in train mode; evaluated in eval mode",),
        modules=modules,
    )


# --------------------------------------------------------------------------- to_dict / to_json


def test_to_dict_top_level_keys_and_values() -> None:
    d = rpt.to_dict(make_report(make_verification()))
    assert d["schema"] == 1
    assert set(d) == {"schema", "tool", "command", "input", "output", "fusions", "skipped", "summary",
                      "verification", "timings", "warnings", "diagnostics", "deployment",
                      "error"}  # no "modules" when empty
    assert d["error"] is None
    assert d["deployment"] == {"fully_deployed": False, "strict": False,
                               "reasons": ["skipped head.bn: BN before a zero-padded conv is not exact at the border",
                                           "1 norm layer left (of 9)"]}
    assert d["diagnostics"] == [{"level": "warning", "code": "unclassified", "module": "",
                                 "message": "model had 2 BN layers in train mode; evaluated in eval mode"}]
    assert d["command"] == "convert"
    assert d["tool"]["name"] == "repfuse"
    assert d["input"]["path"] == "/data/in.pt"  # Path → str
    assert d["output"] == {"path": "/data/out.pt"}
    assert d["timings"] == {"load": 0.12, "fuse": 0.5, "verify": 1.25}
    assert d["warnings"] == ["model had 2 BN layers in train mode; evaluated in eval mode"]


def test_to_dict_fusions_and_skipped() -> None:
    d = rpt.to_dict(make_report())
    f0, f1 = d["fusions"]
    assert set(f0) == {"module", "pattern", "branches", "kernel", "in_channels", "out_channels", "groups",
                       "stride", "dilation", "params_before", "params_after", "max_abs_error"}
    assert f0["module"] == "stage1.0.reparam"
    assert f0["branches"] == ["stage1.0.rbr_dense", "stage1.0.rbr_1x1", "stage1.0.rbr_identity"]
    assert f0["kernel"] == [3, 3] and f0["stride"] == [1, 1] and f0["groups"] == 2
    assert f0["params_before"] == 20_224 and f0["params_after"] == 18_496
    assert f0["max_abs_error"] == pytest.approx(3.2e-12)
    assert f1["dilation"] == [2, 2] and f1["max_abs_error"] is None
    assert d["skipped"] == [{"module": "head.bn",
                             "reason": "BN before a zero-padded conv is not exact at the border"}]


def test_to_dict_summary_has_all_fields() -> None:
    s = rpt.to_dict(make_report())["summary"]
    assert s == {"fusions": 2, "params_before": 1_000_000, "params_after": 900_000,
                 "macs_before": 2_000_000_000, "macs_after": 1_500_000_000, "convs_before": 10,
                 "convs_after": 4, "norms_before": 9, "norms_after": 1, "linears_before": 0, "linears_after": 0}


def test_to_dict_verification_passed() -> None:
    v = rpt.to_dict(make_report(make_verification()))["verification"]
    assert v["passed"] is True
    for key in ("max_abs_error", "max_rel_error", "exact_max_abs_error", "exact_max_rel_error", "atol",
                "rtol", "trials", "input_shape", "seed", "dtype", "worst_sites", "message"):
        assert key in v
    assert v["input_shape"] == [[2, 3, 33, 31]]
    assert v["seed"] == 7 and v["trials"] == 3 and v["dtype"] == "float32"
    assert v["worst_sites"] == []


def test_to_dict_no_verification_is_null() -> None:
    assert rpt.to_dict(make_report(None, command="inspect"))["verification"] is None


def test_inf_and_nan_give_valid_json() -> None:
    v = make_verification(passed=False, err=math.inf)
    v = Verification(**{**v.__dict__, "max_rel_error": math.nan, "exact_max_abs_error": -math.inf})
    r = make_report(v)
    text = rpt.to_json(r)
    assert "Infinity" not in text and "NaN" not in text
    d = json.loads(text)  # strict JSON
    assert d["verification"]["passed"] is False
    assert d["verification"]["max_abs_error"] == "inf"
    assert d["verification"]["max_rel_error"] == "nan"
    assert d["verification"]["exact_max_abs_error"] == "-inf"
    assert d["verification"]["worst_sites"][0] == {"module": "stage2.0.reparam", "max_abs_error": "inf"}


def test_json_round_trip_equals_to_dict() -> None:
    r = make_report(make_verification())
    assert json.loads(rpt.to_json(r)) == rpt.to_dict(r)
    json.dumps(rpt.to_dict(r), allow_nan=False)


def test_modules_only_when_present() -> None:
    mods = (ModuleInfo("", "Net", 10), ModuleInfo("a", "Conv2d", 10, "fused → a"))
    d = rpt.to_dict(make_report(command="inspect", modules=mods))
    assert d["modules"] == [{"path": "", "kind": "Net", "params": 10, "note": ""},
                            {"path": "a", "kind": "Conv2d", "params": 10, "note": "fused → a"}]


# --------------------------------------------------------------------------- markdown / writing


def test_markdown_contains_sites_reasons_and_verdict() -> None:
    md = rpt.to_markdown(make_report(make_verification(passed=False, err=math.inf)))
    assert md.startswith("# repfuse convert report")
    for text in ("stage1.0.reparam", "stage2.0.reparam", "head.bn",
                 "BN before a zero-padded conv is not exact at the border", "FAILED", "inf",
                 "## Summary", "## Verification", "## Timings", "1,000,000", "900,000", "−10.0%"):
        assert text in md, text


def test_markdown_escapes_pipes() -> None:
    r = make_report()
    r = Report(**{**r.__dict__, "skipped": (SkippedSite("x", "a | b"),)})
    assert "a \\| b" in rpt.to_markdown(r)


@pytest.mark.parametrize("name", ["r.json", "r.md", "R.JSON"])
def test_write_report_by_suffix(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    rpt.write_report(make_report(make_verification()), path)
    text = path.read_text(encoding="utf-8")
    if name.lower().endswith(".json"):
        assert json.loads(text)["schema"] == 1
    else:
        assert text.startswith("# repfuse convert report")
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left


def test_write_report_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("old")
    rpt.write_report(make_report(), path)
    assert json.loads(path.read_text())["schema"] == 1


def test_write_report_bad_suffix_and_dir(tmp_path: Path) -> None:
    with pytest.raises(RepfuseError) as e:
        rpt.write_report(make_report(), tmp_path / "r.txt")
    assert ".json" in e.value.hint and ".md" in e.value.hint
    with pytest.raises(RepfuseError):
        rpt.write_report(make_report(), tmp_path / "missing" / "r.json")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- rich


def _rendered(report: Report, width: int = 120, **kw: object) -> str:
    console = Console(record=True, width=width)
    rpt.render(report, console, **kw)
    return console.export_text()


def test_render_passed() -> None:
    text = _rendered(make_report(make_verification()), verbose=True)
    for s in ("stage1.0.reparam", "stage2.0.reparam", "3×3+1×1+identity", "64→128", "head.bn",
              "not exact at the border", "PASSED", "1,000,000", "900,000", "−10.0%", "2G", "1.5G",
              "−25.0%", "2×3×33×31", "float32", "timings:", "verify", "/data/in.pt", "/data/out.pt"):
        assert s in text, s
    assert "Worst sites" not in text
    assert "train mode" not in text  # warnings are for stderr, see render_warnings


def test_render_failed_shows_worst_sites_and_inf() -> None:
    text = _rendered(make_report(make_verification(passed=False, err=math.inf)))
    assert "FAILED" in text and "Worst sites" in text and "inf" in text


def test_render_without_verification_or_timings() -> None:
    r = make_report(None, command="inspect")
    r = Report(**{**r.__dict__, "timings": {}, "fusions": (), "skipped": ()})
    text = _rendered(r)
    assert "Verification" not in text and "none" in text


def test_render_warnings() -> None:
    console = Console(record=True, width=120)
    rpt.render_warnings(make_report(), console)
    expected = "warning: model had 2 BN layers in train mode; evaluated in eval mode"
    assert console.export_text().strip() == expected


def test_render_module_tree_small_shows_everything() -> None:
    mods = (ModuleInfo("", "Net", 100), ModuleInfo("stem", "Sequential", 40),
            ModuleInfo("stem.conv", "Conv2d", 30, "fused → stem.conv"), ModuleInfo("stem.act", "ReLU", 0),
            ModuleInfo("head", "Linear", 60, "opaque: could not trace (data-dependent control flow)"))
    text = _rendered(make_report(command="inspect", modules=mods), all_modules=True)
    for s in ("Net", "stem", "conv", "Conv2d", "fused → stem.conv", "act", "ReLU", "opaque: could not trace"):
        assert s in text, s


def test_render_module_tree_large_collapses_quiet_subtrees() -> None:
    mods = [ModuleInfo("", "Net", 10_000), ModuleInfo("blocks", "Sequential", 9000)]
    for b in range(30):
        if b != 5:  # a missing intermediate module hangs its children on the nearest ancestor
            mods.append(ModuleInfo(f"blocks.{b}", "Block", 300))
        for leaf in ("conv", "bn", "act"):
            note = "skipped: BN in train mode" if (b == 17 and leaf == "bn") else ""
            mods.append(ModuleInfo(f"blocks.{b}.{leaf}", "X", 100, note))
    mods.append(ModuleInfo("head", "Linear", 1000))
    console = Console(record=True, width=120)
    console.print(rpt.module_tree(mods, full_limit=60))
    text = console.export_text()
    assert "skipped: BN in train mode" in text
    assert "head" in text and "blocks" in text  # root's children always shown
    assert "more modules" in text
    assert len(text.splitlines()) < 20


# --------------------------------------------------------------------------- schema, verdict, narrow consoles

jsonschema = pytest.importorskip("jsonschema")

LONG = (
    FusionSite(module="stages.3.blocks.13.conv_kxk.reparameterized_branch_with_a_long_name",
               pattern="3×3+1×1+identity, BN×3, groups=2", branches=("a.b.c", "d.e.f"), kernel=(3, 3),
               in_channels=512, out_channels=512, groups=2, stride=(2, 2), dilation=(1, 1),
               params_before=1_181_184, params_after=1_180_160, max_abs_error=1.1e-15),
    *FUSIONS,
)


def test_schema_is_shipped_and_valid() -> None:
    jsonschema.Draft202012Validator.check_schema(rpt.schema())
    assert rpt.schema()["properties"]["schema"] == {"const": 1}


@pytest.mark.parametrize("error", [None, {"message": "verification failed: x", "hint": "y", "exit_code": 1}])
def test_every_report_here_validates(error) -> None:
    mods = (ModuleInfo("", "Net", 10), ModuleInfo("a", "Conv2d", 10, "fused → a"))
    for report in (make_report(make_verification()), make_report(make_verification(False, math.inf)),
                   make_report(None, "inspect", mods), make_report(make_verification(), "verify")):
        jsonschema.validate(json.loads(rpt.to_json(report, error=error)), rpt.schema())


def test_error_document_validates_and_a_wrong_report_does_not() -> None:
    doc = rpt.error_document("convert", "input file not found: x.pt", "check the path", 2)
    jsonschema.validate(doc, rpt.schema())
    bad = rpt.to_dict(make_report(make_verification()))
    bad["fusions"][0]["groups"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, rpt.schema())
    del bad["fusions"]
    with pytest.raises(jsonschema.ValidationError):  # neither a whole report nor an error
        jsonschema.validate(bad, rpt.schema())


def test_verdict_line_comes_first() -> None:
    r = make_report(make_verification())
    r = Report(**{**r.__dict__, "output": {"path": "/data/out.pt", "size_bytes": 493_855}})
    first = _rendered(r, 80).splitlines()[0]
    assert first == "PASSED · /data/out.pt (482.3 KiB) · 2 fused · norms 9 → 1 · 1 skipped · max err 1.5e-06"
    failed = make_report(make_verification(passed=False, err=math.inf))
    assert rpt.verdict(Report(**{**failed.__dict__, "output": None})).startswith("FAILED · nothing written · ")
    strict = Report(**{**r.__dict__, "strict": True})
    assert rpt.verdict(strict).startswith("NOT DEPLOYED · ")


def test_hashes_and_factory_args_only_when_verbose() -> None:
    r = make_report(make_verification())
    r = Report(**{**r.__dict__, "input": {"path": "/data/in.pt", "sha256": "ab" * 32, "factory_args": {"k": 1}}})
    assert "abab" not in _rendered(r) and "factory_args" not in _rendered(r)
    assert "abab" in _rendered(r, verbose=True) and "factory_args" in _rendered(r, verbose=True)


@pytest.mark.parametrize("width", [60, 80, 100, 140])
def test_narrow_consoles_never_break_identifiers(width: int) -> None:
    r = make_report(make_verification(passed=False, err=0.5))
    r = Report(**{**r.__dict__, "fusions": LONG,
                  "skipped": (SkippedSite("stages.3.blocks.13.attn.proj_drop.some_norm", "BN without running "
                                          "statistics (track_running_stats=False)"),)})
    text = _rendered(r, width)
    lines = text.splitlines()
    for name in [s.module for s in LONG] + ["stages.3.blocks.13.attn.proj_drop.some_norm"]:
        assert any(name in line for line in lines), (name, text)
    if width < 110:
        assert "┃ pattern" not in text  # the name/detail list, not a table with folded cells


def test_markdown_summary_for_the_step_summary() -> None:
    r = Report(**{**make_report(make_verification()).__dict__, "strict": True})
    md = rpt.summary_markdown(r, {"message": "not fully deployed", "hint": "h", "exit_code": 4})
    assert md.startswith("### repfuse convert: NOT DEPLOYED · ")
    assert "#### Not fully deployed (--strict: nothing written)" in md and "- skipped head.bn" in md
    assert "**error** (exit 4): not fully deployed" in md and "| `stage1.0.reparam` |" in md
