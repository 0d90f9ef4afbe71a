"""The GPU campaign's dry run (toy sizes on the CPU): every part reports figures or says why not, within the
budget, and the JSON on disk is the report."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_campaign

BUDGET_S = 30.0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("campaign")
    report = gpu_campaign.main(["--dry_run", "--budget_s", str(BUDGET_S), "--output_dir", str(output_dir)])
    return report, json.loads((output_dir / "campaign.json").read_text())


def test_every_part_is_reported_within_the_budget(dry_run):
    report, saved = dry_run
    assert saved["parts"].keys() == set(gpu_campaign.PARTS) and saved["dry_run"] and saved["budget_s"] == BUDGET_S
    assert saved["elapsed_s"] <= BUDGET_S + 15  # a measurement under way may run past its part's deadline
    assert {"torch", "transformers", "device_name"} <= set(saved["environment"]) and saved["wheels_installed"]
    for part, record in saved["parts"].items():
        assert "error" not in record, (part, record.get("error"))
        assert "skipped" in record or record["seconds"] > 0


def test_decode_and_training_give_figures_or_a_reason_per_row(dry_run):
    parts = dry_run[1]["parts"]
    decode = parts["decode"]
    assert decode["bandwidth_gbs"] > 0
    measured = 0
    for model_type, result in decode["architectures"].items():
        assert "error" not in result, model_type
        for row in result.get("rows", []):
            if "unavailable" not in row:  # a step time at or below zero (CPU noise at toy sizes) has no fraction
                assert row["tokens_per_second"] > 0 and row["bytes_per_step"] > 0
                assert row["decode_step_ms"] <= 0 or row["fraction_of_floor"] > 0
            measured += "tokens_per_second" in row
        assert "rows" in result or result["skipped"]
    assert measured > 0 and set(decode["architectures"]) == {spec.model_type for spec in gpu_campaign.causal_specs()}
    training = parts["training"]
    if "skipped" not in training:
        for row in training["rows"]:
            assert "skipped" in row or (row["tokens_per_second"] > 0 and 0 < row["mfu"] < 1), row


def test_experiments_and_correctness_report_results_or_why_not(dry_run):
    parts = dry_run[1]["parts"]
    if "skipped" not in parts["experiments"]:
        for name, run in parts["experiments"]["runs"].items():
            assert "skipped" in run or run.get("timed_out") or ("report" in run and run["returncode"] == 0), name
    correctness = parts["correctness"]
    if "skipped" not in correctness:
        for model_type, result in correctness["cached_vs_uncached"].items():
            assert "skipped" in result or result["identical"], model_type


def test_the_budget_skips_parts_that_no_longer_fit(tmp_path, capsys):
    report = gpu_campaign.main(["--dry_run", "--budget_s", "1", "--parts", "decode,correctness",
                                "--output_dir", str(tmp_path)])
    assert report["parts"]["training"]["skipped"] == "not in --parts"
    assert all(record["skipped"] == "the time budget ran out"
               for part, record in report["parts"].items() if part in ("decode", "correctness"))
    assert "part decode: skipped (the time budget ran out)" in capsys.readouterr().out


def test_unknown_parts_are_refused():
    from training.common import UsageError

    with pytest.raises(UsageError, match="unknown parts"):
        gpu_campaign.main(["--dry_run", "--parts", "decode,inference"])
