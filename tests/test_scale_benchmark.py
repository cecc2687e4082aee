"""benchmarks/scale.py's verdicts: the ratios that decide whether the driver stays flat."""

from tests.conftest import benchmark_module


def scale_module():
    return benchmark_module("scale")


def result(users, rss, cpu_per_1000):
    return {"users": users, "stages": {"score": {"driver_peak_rss_mib": rss, "driver_cpu_s_per_1000": cpu_per_1000}}}


def test_ratios_compare_the_smallest_and_largest_size_whatever_the_order():
    scale = scale_module()
    out = scale.ratios([result(100_000, 330.0, 0.9), result(20_000, 300.0, 1.0), result(1_000_000, 400.0, 0.8)])
    verdict = out["score"]
    assert verdict["users"] == [20_000, 1_000_000]
    assert verdict["rss_ratio"] == round(400 / 300, 3) and verdict["rss_ok"] is False  # over 1.2x
    assert verdict["cpu_per_user_ratio"] == 0.8 and verdict["cpu_ok"] is True


def test_one_size_has_no_verdict():
    assert scale_module().ratios([result(2000, 300.0, 1.0)]) == {}


def test_a_stage_measured_at_fewer_sizes_is_judged_on_its_own_sizes_and_merges_keep_the_others():
    scale = scale_module()
    small = {"users": 20_000, "stages": {"summarize": {"driver_peak_rss_mib": 300.0, "driver_cpu_s_per_1000": 1.0},
                                         "score": {"driver_peak_rss_mib": 310.0, "driver_cpu_s_per_1000": 1.0}}}
    middle = result(100_000, 330.0, 1.1)  # score only
    large = {"users": 1_000_000, "stages": {"summarize": {"driver_peak_rss_mib": 330.0, "driver_cpu_s_per_1000": 0.9}}}
    out = scale.ratios([small, middle, large])
    assert out["summarize"]["users"] == [20_000, 1_000_000] and out["summarize"]["rss_ok"] is True
    assert out["score"]["users"] == [20_000, 100_000] and out["score"]["rss_ratio"] == round(330 / 310, 3)
    # a --stages run replaces only its stages of a size
    again = {"users": 20_000, "stages": {"summarize": {"driver_peak_rss_mib": 290.0, "driver_cpu_s_per_1000": 1.0}}}
    merged = scale.merge_sizes([small, middle], {20_000: again}, stages_only=True)
    assert merged[0]["stages"]["summarize"]["driver_peak_rss_mib"] == 290.0
    assert merged[0]["stages"]["score"]["driver_peak_rss_mib"] == 310.0 and merged[1] is middle
