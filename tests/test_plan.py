"""The resource plan as a typed result: a table per resource, JSON round trip, the text it replaces."""
from helpers.runs.plan import GB, Machine, Plan, plan
from helpers.settings.profiles import get_profile


def test_plan_is_a_result_with_a_row_per_resource():
    t4 = Machine("t4", "Tesla T4", 12.7 * GB, 100 * GB, 15 * GB)
    p = plan(get_profile("colab"), t4, scratch=True)
    rows = {r["resource"]: r for r in p.rows()}
    assert set(rows) == {"disk (cache)", "local scratch ($SAE_SCRATCH)", "peak host RAM", "peak GPU memory",
                         "time, estimated"}
    assert rows["peak host RAM"]["needs"] == f"{p.host_peak / GB:.2f} GB"
    assert rows["disk (cache)"]["needs"] == f"{p.disk_bytes / GB:.2f} GB" and "training store" in rows["disk (cache)"]["of which"]
    back = Plan.from_dict(p.to_dict())
    assert back == p and back.host_peak == p.host_peak and back.table() == p.table()
    assert "'colab' on Tesla T4" in str(p) and "<table" in p._repr_html_()
    cpu = plan(get_profile("test"), Machine("cpu", "CPU", 8 * GB, 100 * GB), scratch=False)
    assert "peak GPU memory" not in {r["resource"] for r in cpu.rows()}
