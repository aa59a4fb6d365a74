"""The harness's own checks: window arithmetic, and one real contender against the real
bench simulator process (small, a few seconds)."""

from __future__ import annotations

from pathlib import Path

from worker.simulator.demo import COMBOS, Demo

from . import contenders
from .harness import SimServer, run_measured
from .limits import area, recovery
from .metrics import max_sliding, windows
from .scenarios import images_for_region_rows, private_pages, write_rows


def test_the_area_under_a_schedule_and_the_time_back_to_90_percent() -> None:
    schedule = ((0.0, 100.0), (2.0, 10.0), (4.0, 0.0), (4.5, 100.0))
    assert area(schedule, 1.0, 5.0) == 100 + 20 + 0 + 50
    # 2xx answers: 10/s until 4.5 s, then 40/s for half a second, then 100/s
    log = [(k / 10, "patch", 200) for k in range(45)]
    log += [(4.5 + k / 40, "patch", 200) for k in range(20)]
    log += [(5.0 + k / 100, "patch", 200) for k in range(100)]
    assert recovery(log, 4.5, 100.0) == 0.91  # 45 in (t - 0.5, t]: 3 at 40/s, 42 at 100/s
    assert recovery(log[:65], 4.5, 100.0) is None


def test_windows_count_each_second_and_average_full_ones() -> None:
    arrivals = [(0.0, "list", 200), (0.5, "patch", 200), (0.9, "patch", 429),
                (1.2, "patch", 200), (1.3, "patch", 200), (2.5, "patch", 200)]
    w = windows(arrivals)
    assert w["total"] == [3, 2, 1]
    assert w["ok"] == [2, 2, 1]
    assert w["r429"] == [1, 0, 0]
    assert w["useful_rate"] == 2.0  # windows 0 and 1; window 2 is partial
    assert w["max_window"] == 3
    assert w["max_sliding"] == 4  # (0.3, 1.3] holds 0.5, 0.9, 1.2, 1.3
    assert w["apply_span_s"] == 2.0  # first PATCH at 0.5, last request at 2.5
    assert w["apply_rate"] == 2.0  # four 2xx answers from 0.5 on
    assert w["r429_first_2s"] == 1
    assert w["r429_share_after_2s"] == 0.0  # only the arrival at 2.5 is after 0.5 + 2


def test_max_sliding_excludes_the_left_edge() -> None:
    assert max_sliding([0.0, 1.0, 2.0]) == 1
    assert max_sliding([0.0, 0.999, 1.5]) == 2
    assert windows([])["useful_rate"] == 0.0


def test_private_pages_counts_one_page_per_region_at_least() -> None:
    assert private_pages(0) == len(COMBOS)
    assert private_pages(60) == len(COMBOS)


def test_region_rows_fit_and_name_existing_images(tmp_path: Path) -> None:
    images = images_for_region_rows(500)
    demo = Demo(images, 0)
    assert len(demo.blocks[(1337, 7)]) >= 500
    path = tmp_path / "rows.csv"
    assert write_rows(path, images, 200, private_only=True) == 200
    lines = path.read_text().splitlines()
    assert lines[0] == "project_id,region_id,image_id"
    ids = [line.split(",")[2] for line in lines[1:]]
    assert all(demo.index_of(i) is not None for i in ids)
    assert all(demo.base(demo.index_of(i) or 0).visibility == "private" for i in ids)


def test_floor_against_the_bench_simulator_updates_every_private_image() -> None:
    images = 60
    demo = Demo(images, 0)
    private = sum(1 for i in range(images) if demo.base(i).visibility == "private")
    with SimServer(images=images) as sim:
        run = contenders.floor("floor", sim.url, concurrency=4)
        counters = sim.counters()
        arrivals = sim.arrivals()
    assert run.updated == private and run.failed == 0
    assert counters["requests"]["patch"] == private
    assert counters["requests"]["list"] == len(COMBOS)
    assert len(arrivals) == counters["total"]
    assert all(status == 200 for _, _, status in arrivals)
    assert run.proc.cpu_s > 0 and run.proc.maxrss_mb > 10
    assert sim.cpu_s > 0  # stopped, and its CPU taken from wait4


def test_run_measured_reports_exit_code_and_output() -> None:
    proc = run_measured(["python3", "-c", "import sys; print('{\"x\": 1}'); sys.exit(3)"])
    assert proc.rc == 3
    assert proc.last_json() == {"x": 1}
